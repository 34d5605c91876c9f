"""The kernel sources each emulator transcribes, by SHA-256 (first 16 hex digits). An emulator checks
them before it runs and fails when one has changed since it was last brought in step: a kernel edit
cannot pass CI beside a stale emulator. After updating an emulator to a kernel change, run it with
--accept-sources and paste the printed line into its SOURCES."""
import hashlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


def digest(rel):
    with open(os.path.join(ROOT, rel), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def check(sources):
    """Exit 1, naming each changed file, unless every file in `sources` ({path: digest}) is unchanged;
    with --accept-sources on the command line, print the current digests and exit 0 instead."""
    now = {rel: digest(rel) for rel in sources}
    if "--accept-sources" in sys.argv:
        print("SOURCES = %r" % now)
        sys.exit(0)
    stale = [rel for rel in sources if now[rel] != sources[rel]]
    if stale:
        print("the emulated kernel sources changed since this emulator was checked against them: %s"
              % ", ".join(stale))
        print("bring the emulator in step with them, then run it with --accept-sources and update SOURCES")
        sys.exit(1)
