#!/usr/bin/env bash
# The canary: the newest releases of every dependency that pyproject.toml allows (no lock), in a fresh
# virtual environment of their own, against the short exactness smoke (tests marked `canary`: CLI swarm
# generate == local model, one prefill + one-token session steps on the peers, failover replay exact,
# the demo's route and text, and the pins of transformers' cache spelling). Prints the versions it
# tested and how they differ from requirements.lock. A red canary means a release inside our ranges
# broke us: fix it, or lower the upper bound in pyproject.toml, before a user meets it.
#
#   bash scripts/canary.sh         (= make canary; CI runs it after the suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CANARY_VENV:-$(mktemp -d)/canary-venv}
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
trap 'rm -rf "$VENV"' EXIT
PYTHON="$VENV/bin/python" bash scripts/install.sh --latest

echo "[canary] newest allowed releases, against requirements.lock:"
"$VENV/bin/python" - <<'EOF'
import re
from importlib.metadata import distributions

locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open("requirements.lock").read(), re.MULTILINE))
locked = {name.lower().replace("_", "-"): v for name, v in locked.items()}
for dist in sorted(distributions(), key=lambda d: d.metadata["Name"].lower()):
    name = dist.metadata["Name"].lower().replace("_", "-")
    if name in ("pip", "swarmlm"):
        continue
    pinned = locked.get(name)
    if name == "torch":
        note = "   (installed first by scripts/install.sh: the lock leaves it out)"
    else:
        note = "" if pinned == dist.version else f"   (lock: {pinned})" if pinned else "   (not in the lock)"
    print(f"[canary]   {name}=={dist.version}{note}")
EOF
echo "[canary] running the exactness smoke (pytest -m canary)"
"$VENV/bin/python" -m pytest -q -m canary tests
