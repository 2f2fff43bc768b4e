#!/usr/bin/env python3
"""Self time of a `perf record` of the gateway, by whose code it is: the
kernel, libc, the allocator, and each Rust crate (a monomorphised function
counts for the crate that wrote it, as its symbol names it).

    python3 benches/perf_by_crate.py target/bench-results/gateway-perf-throughput.data [--comm tokio-rt-worker]

Prints each owner's share of the samples, then our crate's top symbols, so
that "how much of this could a change of ours remove" has a number.
"""
import re
import subprocess
import sys
from collections import defaultdict


def owner(sym: str, dso: str) -> str:
    if sym.startswith("[k]"):
        return "kernel"
    name = sym[4:] if sym.startswith("[.] ") else sym
    if "jemalloc" in dso or name.startswith(("_rjem_", "je_", "sdallocx", "malloc", "free", "calloc", "realloc")):
        return "allocator (jemalloc)"
    if "libc" in dso or "ld-linux" in dso or "vdso" in dso or name.startswith(("__mem", "__libc", "pthread_", "__GI_", "syscall")):
        return "libc / vdso"
    # `<A as B>::f`: the code is A's impl; for a blanket impl of B on A, the
    # symbol still names A first, so A is the owner either way.
    m = re.match(r"<?&?(?:mut )?(?:dyn )?([A-Za-z_][A-Za-z0-9_]*)::", name)
    if m:
        return m.group(1)
    if name.startswith("0x") or name == "":
        return "unknown"
    return "other: " + name.split("(")[0][:40]


def main() -> None:
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    data = args[0]
    cmd = ["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none", "--percent-limit", "0"]
    if "--comm" in args:
        cmd += ["--comms", args[args.index("--comm") + 1]]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    shares = defaultdict(float)
    ours = defaultdict(float)
    line_re = re.compile(r"^\s+([0-9.]+)%\s+(\S+)\s+(\[[k.]\] .*?)\s*$")
    for line in out.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3)
        who = owner(sym, dso)
        shares[who] += pct
        if who == "llm_gateway":
            ours[sym[4:][:110]] += pct
    total = sum(shares.values())
    print(f"self time by owner ({total:.1f} % of samples attributed)")
    for who, pct in sorted(shares.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {pct:6.2f} %  {who}")
    print("our crate's top symbols")
    for sym, pct in sorted(ours.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {pct:6.2f} %  {sym}")


if __name__ == "__main__":
    main()
