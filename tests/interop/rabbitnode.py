"""A private RabbitMQ node for tests that compare Rill with the real thing in CI.

Debian's ``rabbitmq-server`` package (scripts/test.sh installs it) runs as a system
service; here a node of our own runs under a temporary directory instead: its own AMQP
port, Erlang distribution port and cookie, mnesia and logs, listening on loopback only,
started without systemd by calling the scripts in ``/usr/lib/rabbitmq/bin`` directly.

    node = RabbitNode(tmp_path / "rmq").start()
    node.url   # amqp://guest:guest@127.0.0.1:<port>/%2F
    node.ctl("add_user", "bob", "secret")
    node.stop()
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time

from conftest import free_port, port_open

RMQ_BIN = pathlib.Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT = 120.0


def available() -> bool:
    return (RMQ_BIN / "rabbitmq-server").exists()


class RabbitNode:
    def __init__(self, directory: pathlib.Path, port: int | None = None,
                 management: bool = False):
        self.dir = directory
        self.port = port or free_port()
        self.dist_port = free_port()
        # With the management plugin: its HTTP API on this loopback port.
        self.http_port = free_port() if management else None
        self.node = f"rilltest{self.port}@localhost"
        self.wrapper: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> dict[str, str]:
        d = self.dir
        return dict(
            os.environ,
            HOME=str(d),  # the Erlang cookie lives in $HOME
            RABBITMQ_CONF_ENV_FILE="/dev/null",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(d / "rabbit.pid"),
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_PLUGINS_EXPAND_DIR=str(d / "plugins-expand"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )

    def start(self) -> "RabbitNode":
        if not available():
            raise RuntimeError("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        for sub in ("mnesia", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        conf = self.dir / "rabbitmq.conf"
        if not conf.exists():
            conf.write_text(
                f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
                "loopback_users.guest = true\n"
                "log.file.level = info\nlog.console = false\n"
                + (f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.http_port}\n"
                   if self.http_port else "")
            )
        plugins = self.dir / "enabled_plugins"
        if not plugins.exists():
            plugins.write_text("[rabbitmq_management].\n" if self.http_port else "[].\n")
        (self.dir / "rabbit.pid").unlink(missing_ok=True)
        out = open(self.dir / "log" / "startup.log", "ab")
        # Its own session, so stopping it never signals the test runner.
        self.wrapper = subprocess.Popen(
            [str(RMQ_BIN / "rabbitmq-server")], env=self.env(), cwd=self.dir,
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.dir / "rabbit.pid").exists() or not (self.dir / "rabbit.pid").read_text().strip():
            if self.wrapper.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited during start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"rabbitmq-server wrote no pid file:\n{self.log_tail()}")
            time.sleep(0.2)
        self.ctl("wait", "--timeout", str(int(START_TIMEOUT)), str(self.dir / "rabbit.pid"))
        while not port_open(self.port) or (self.http_port and not port_open(self.http_port)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"rabbitmq is not listening on {self.port}:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def ctl(self, *args: str, timeout: float = START_TIMEOUT) -> str:
        res = subprocess.run(
            [str(RMQ_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env(),
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({res.returncode}):\n"
                               f"{res.stdout}\n{res.stderr}")
        return res.stdout

    @property
    def pid(self) -> int:
        return int((self.dir / "rabbit.pid").read_text().strip())

    def stop(self) -> None:
        try:
            self.ctl("stop", str(self.dir / "rabbit.pid"), timeout=60)
        except Exception:
            self.kill()
            return
        if self.wrapper is not None:
            try:
                self.wrapper.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL to the node and its wrapper (their whole process group)."""
        if self.wrapper is not None and self.wrapper.poll() is None:
            try:
                os.killpg(self.wrapper.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wrapper.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for p in sorted((self.dir / "log").glob("*.log")):
            text.extend(p.read_text(errors="replace").splitlines())
        return "\n".join(text[-lines:])
