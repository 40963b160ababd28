//! SIGTERM and SIGINT for job processes: a standalone job (or a program of your own that
//! runs one) stops cleanly on either, as `rill job run` does.

/// Stops the jobs of `handle`'s environment when SIGTERM or SIGINT arrives.
///
/// ```no_run
/// let env = rill_stream::StreamExecutionEnvironment::new();
/// rill_jobs::signals::stop_on_terminate(env.stop_handle());
/// ```
pub fn stop_on_terminate(handle: rill_stream::StopHandle) {
    on_terminate(move || handle.stop());
}

/// Calls `f`, on a thread of its own, every time SIGUSR1 arrives (`rill job savepoint`
/// sends it to ask for a checkpoint now).
pub fn on_user1(f: impl Fn() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("rill-sigusr1".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                tracing::warn!("cannot watch SIGUSR1: rill job savepoint will not reach this job");
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
                    tracing::warn!(
                        "cannot watch SIGUSR1: rill job savepoint will not reach this job"
                    );
                    return;
                };
                while usr1.recv().await.is_some() {
                    f();
                }
            });
        });
    if spawned.is_err() {
        tracing::warn!("cannot watch SIGUSR1: rill job savepoint will not reach this job");
    }
}

/// Calls `f` once, on a thread of its own, when SIGTERM or SIGINT arrives.
pub fn on_terminate(f: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("rill-signals".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                tracing::warn!("cannot watch signals: SIGTERM will not stop the job cleanly");
                return;
            };
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            });
            tracing::info!("signal received: stopping");
            f();
        });
    if spawned.is_err() {
        tracing::warn!("cannot watch signals: SIGTERM will not stop the job cleanly");
    }
}
