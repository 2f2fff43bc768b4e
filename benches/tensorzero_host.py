"""Hosts TensorZero's gateway for the bench (issue #17).

The `tensorzero` package embeds TensorZero's Rust gateway; this starts it on
loopback from the config file given as the only argument, with no ClickHouse,
Postgres or Valkey, and prints three lines on stdout:

    version V                  (the tensorzero package's)
    rss_before_start_kib N     (this Python process, tensorzero imported)
    base_url URL               (the OpenAI-compatible API: URL/chat/completions)

then stays alive until its stdin closes or it gets SIGTERM/SIGINT, and closes
the gateway. Errors go to stderr with a non-zero exit.
"""

import signal
import sys
import threading


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: tensorzero_host.py CONFIG.toml", file=sys.stderr)
        return 2
    import tensorzero
    from importlib.metadata import version

    print(f"version {version('tensorzero')}", flush=True)
    print(f"rss_before_start_kib {rss_kib()}", flush=True)
    gateway = tensorzero._start_http_gateway(
        config_file=sys.argv[1],
        clickhouse_url=None,
        postgres_url=None,
        valkey_url=None,
        async_setup=False,
    )
    print(f"base_url {gateway.base_url}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())

    def watch_stdin() -> None:
        # EOF on stdin: the bench went away (or closed it on purpose).
        sys.stdin.buffer.read()
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    # Wakes now and then so that signals are handled promptly; the gateway's
    # own threads do the work, this one only waits.
    while not done.wait(1.0):
        pass
    gateway.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
