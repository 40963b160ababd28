"""The seed's two examples, joined — exactly the steps of the README's first screen:

1. ``rill server --job examples/jobs/hello-wordcount.toml`` runs a wordcount that reads
   queue ``hello`` and writes ``hello-counts``;
2. the RabbitMQ tutorial's ``send.py``, unmodified, publishes "Hello World!" to ``hello``;
3. the tutorial's ``receive.py``, pointed at ``hello-counts``, prints
   ``{"word":"Hello","count":1}`` and ``{"word":"World!","count":1}``; run ``send.py``
   again and the counts become 2.
"""

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from conftest import REFERENCE_URL, port_open, rill_bin
from test_lifecycle import TUTORIAL, LineReader, run_script

REPO = pathlib.Path(__file__).resolve().parents[2]
JOB_FILE = REPO / "examples" / "jobs" / "hello-wordcount.toml"


def receive_pointed_at(queue: str, tmp: pathlib.Path) -> subprocess.Popen:
    """The tutorial's receive.py with its queue name replaced, nothing else."""
    text = (TUTORIAL / "receive.py").read_text().replace("'hello'", f"'{queue}'")
    script = tmp / "receive_counts.py"
    script.write_text(text)
    return subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


@pytest.mark.timeout(120)
@pytest.mark.skipif(bool(REFERENCE_URL), reason="runs rill server --job: Rill mode only")
def test_send_py_through_the_wordcount_to_receive_py(tmp_path):
    if port_open(5672) or port_open(15672):
        pytest.skip("port 5672 or 15672 is busy")
    log = open(tmp_path / "rill.log", "wb")
    # As the README says it, from a fresh directory (data goes to ./rill-data).
    server = subprocess.Popen([str(rill_bin()), "server", "--job", str(JOB_FILE)],
                              cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              env=dict(os.environ, NO_COLOR="1"))
    receive = None
    try:
        import time
        deadline = time.monotonic() + 30
        while not port_open(5672):
            assert server.poll() is None, (tmp_path / "rill.log").read_text()
            assert time.monotonic() < deadline, "rill server did not listen on 5672"
            time.sleep(0.05)

        send = run_script("send.py")
        out, _ = send.communicate(timeout=20)
        assert send.returncode == 0, out

        receive = receive_pointed_at("hello-counts", tmp_path)
        reader = LineReader(receive)
        reader.expect(" [*] Waiting for messages. To exit press CTRL+C")
        reader.expect(""" [x] Received b'{"word":"Hello","count":1}'""")
        reader.expect(""" [x] Received b'{"word":"World!","count":1}'""")

        send = run_script("send.py")
        out, _ = send.communicate(timeout=20)
        assert send.returncode == 0, out
        reader.expect(""" [x] Received b'{"word":"Hello","count":2}'""")
        reader.expect(""" [x] Received b'{"word":"World!","count":2}'""")

        receive.send_signal(signal.SIGINT)
        reader.expect("Interrupted")
        assert receive.wait(timeout=15) == 0
    finally:
        if receive is not None and receive.poll() is None:
            receive.kill()
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(30) == 0
        finally:
            if server.poll() is None:
                server.kill()
            log.close()
