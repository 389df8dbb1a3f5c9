#!/usr/bin/env bash
# Idempotent installer: system packages (apt) that are missing, then this package in editable
# mode with its test extras, with torch pinned by constraints.txt. Fast when everything is there:
# apt is only touched for packages dpkg does not report as installed, and pip only runs when the
# requirements declared in setup.py (read from the file, not from stale metadata) are unmet or the
# editable install does not point at this checkout.
#
# Knobs (environment):
#   SKIP_APT=1         skip the system-package step
#   FORCE_PIP=1        run the pip install even when everything looks satisfied
#   PYTHON=python3     interpreter to install into
#   TORCH_INDEX_URL    extra index for torch==2.13.0 if it is missing (default: none; pip takes the
#                      CPU wheel this machine image keeps on disk). On a machine without that wheel,
#                      set it to the PyTorch CPU index so pip does not pull the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

PYTHON="${PYTHON:-python3}"
TORCH_PIN="2.13.0"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
APT_PACKAGES=(slurmctld slurmd slurm-client munge docker.io debootstrap iproute2 procps)

log() { echo "install.sh: $*"; }
die() { echo "install.sh: ERROR: $*" >&2; exit 1; }

# ---- 1. system packages
if [ "${SKIP_APT:-0}" = "1" ]; then
  log "apt: skipped (SKIP_APT=1)"
else
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    # dpkg -s succeeds for removed-but-configured packages too; require "install ok installed".
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "apt: all present (${APT_PACKAGES[*]})"
  else
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
      command -v sudo >/dev/null || die "apt packages missing (${missing[*]}) and not root, no sudo"
      SUDO=(sudo)
    fi
    log "apt: installing ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
      "${missing[@]}"
    log "apt: installed ${missing[*]}"
  fi
fi

# ---- 2. torch (CPU wheel) if absent: installing it through the deepspeed/megatron resolve
#         would fetch the CUDA build from PyPI.
command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
  || die "$PYTHON is older than 3.11"
# Metadata, not `import torch`: importing costs seconds and this runs on every `make test`.
torch_version="$("$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))' \
  2>/dev/null || true)"
if [[ "$torch_version" != "$TORCH_PIN"* ]]; then
  log "pip: torch is '${torch_version:-absent}', installing torch==$TORCH_PIN"
  extra=()
  [ -n "$TORCH_INDEX_URL" ] && extra=(--extra-index-url "$TORCH_INDEX_URL")
  "$PYTHON" -m pip install -q -c constraints.txt "${extra[@]}" "torch==$TORCH_PIN"
else
  log "pip: torch $torch_version already installed"
fi

# ---- 3. this package (editable) + test extras, only when something is unmet
check_installed() {
  "$PYTHON" - "$REPO" <<'PY'
import json
import sys
from importlib import metadata
from pathlib import Path

import setuptools
from packaging.requirements import Requirement

repo = Path(sys.argv[1]).resolve()
# Run from the checkout, sys.path[0] would find a stray diffmoe_dist.egg-info here instead of
# the installed metadata.
sys.path = [p for p in sys.path if p and Path(p).resolve() != repo]
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)  # read setup.py's declarations, not metadata
sys.argv = ["setup.py"]
exec(compile((repo / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "__main__"})
reqs = list(captured["install_requires"]) + list(captured["extras_require"].get("test", []))
problems = []
try:
    dist = metadata.distribution(captured["name"])
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct.get("url", "")
    if not direct.get("dir_info", {}).get("editable") or Path(url.removeprefix("file://")) != repo:
        problems.append(f"{captured['name']} is not an editable install of {repo} ({url or 'no url'})")
    want_eps = set(captured["entry_points"]["console_scripts"])
    have_eps = {f"{ep.name}={ep.value}" for ep in dist.entry_points if ep.group == "console_scripts"}
    if want_eps != have_eps:
        problems.append(f"console_scripts differ: {sorted(want_eps ^ have_eps)}")
except metadata.PackageNotFoundError:
    problems.append(f"{captured['name']} not installed")
for line in reqs:
    req = Requirement(line)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        problems.append(f"{req.name} missing")
        continue
    if not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req.name} {version} does not satisfy {req.specifier}")
for p in problems:
    print(f"install.sh:   unmet: {p}")
sys.exit(1 if problems else 0)
PY
}

if [ "${FORCE_PIP:-0}" != "1" ] && check_installed; then
  log "pip: diffmoe-dist (editable) and all requirements already satisfied"
else
  log "pip: DS_BUILD_OPS=0 pip install -c constraints.txt -e .[test]"
  DS_BUILD_OPS=0 "$PYTHON" -m pip install -q -c constraints.txt -e ".[test]"
  check_installed || die "requirements still unmet after pip install"
  # pyenv only creates shims for new console scripts (diffmoe-demo, ...) on rehash.
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi

# ---- 3b. torch-fidelity's InceptionV3 (FID) without its torchvision dependency: PyPI's torchvision
#          does not import beside this torch, and the Inception module itself is pure torch.
if ! "$PYTHON" -c 'from importlib.metadata import version; assert version("torch-fidelity") == "0.4.0"' 2>/dev/null; then
  log "pip: torch-fidelity==0.4.0 --no-deps"
  "$PYTHON" -m pip install -q -c constraints.txt --no-deps "torch-fidelity==0.4.0"
fi

# ---- 4. verify: the torch pin survived, and the package imports from this checkout
"$PYTHON" -c "import torch; assert torch.__version__.startswith('$TORCH_PIN'), torch.__version__" \
  || die "torch is not $TORCH_PIN after install (something replaced it; see constraints.txt)"
(cd / && "$PYTHON" -c "import diffmoe_dist, pathlib, sys; \
p = pathlib.Path(diffmoe_dist.__file__).resolve().parents[1]; \
sys.exit(0 if p == pathlib.Path('$REPO').resolve() else f'diffmoe_dist imports from {p}, not $REPO')") \
  || die "diffmoe_dist does not import from $REPO"
log "ok: torch $("$PYTHON" -c 'import torch; print(torch.__version__)'), diffmoe_dist from $REPO"
