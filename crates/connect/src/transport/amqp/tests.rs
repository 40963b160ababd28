use super::*;

#[test]
fn backoff_doubles_up_to_the_cap_and_resets() {
    let opts = AmqpOptions::default();
    let mut b = Backoff::new(&opts);
    let got: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
    assert_eq!(got, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    b.reset();
    assert_eq!(b.next(), Duration::from_millis(100));
}

#[test]
fn the_uri_shown_in_messages_has_no_password() {
    let ep = Endpoint::parse("amqp://bob:s3cret@example.org:5673/prod", "n".into())
        .expect("a valid URI");
    assert_eq!(ep.shown, "amqp://bob@example.org:5673/prod");
    let ep =
        Endpoint::parse("amqp://guest:guest@localhost:5672/%2f", "n".into()).expect("a valid URI");
    assert_eq!(ep.shown, "amqp://guest@localhost:5672/%2f");
    for bad in ["http://nope", "amqps://guest:guest@localhost:5671/%2f"] {
        assert!(
            matches!(
                Endpoint::parse(bad, "n".into()),
                Err(ConnectError::Config(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn refusals_are_sorted_by_reply_code() {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let refused = |kind: AMQPErrorKind| {
        let e: lapin::Error =
            lapin::ErrorKind::ProtocolError(AMQPError::new(kind, "text".into())).into();
        classify("x", &e)
    };
    match refused(AMQPSoftError::NOTFOUND.into()) {
        Failure::Fatal(e) => assert_eq!(e.reply_code(), Some(404)),
        other => panic!("404 must be fatal, got {other:?}"),
    }
    match refused(AMQPHardError::NOTALLOWED.into()) {
        Failure::Fatal(e) => assert_eq!(e.reply_code(), Some(530)),
        other => panic!("530 must be fatal, got {other:?}"),
    }
    assert!(matches!(
        refused(AMQPHardError::CONNECTIONFORCED.into()),
        Failure::Retry(_)
    ));
    let io: lapin::Error = std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
    assert!(matches!(classify("x", &io), Failure::Retry(_)));
}
