#!/usr/bin/env bash
# Idempotent installer. Which mode needs what:
#
#   tools/install.sh --venv .venv        NO root. Creates (or reuses) a virtual environment, then installs
#                                        torch's CPU wheel (torch==2.13.0+cpu) and this package (editable,
#                                        with its test extras) into it. `make demo` runs this. A venv is
#                                        what avoids pip's PEP 668 "externally-managed-environment" on a
#                                        distribution's python3. Needs `python3 -m venv` (Debian/Ubuntu:
#                                        the python3-venv package) and a Python >= 3.11.
#   tools/install.sh                     NO root. Into the environment $PYTHON already is (a conda env, a
#                                        cluster module, your own venv, the NGC container): torch pinned to
#                                        2.13.0, or with --keep-torch the torch that is already there (NGC,
#                                        a site CUDA build) is pinned instead and never replaced.
#   tools/install.sh --system-packages   ROOT or sudo. Also the apt packages that the SLURM and Docker
#                                        tests start (slurmctld, slurmd, munge, docker.io, debootstrap).
#                                        `make test` (and so CI, .ci/run) runs this, into $PYTHON.
#
#   --dry-run   decide as usual (what is missing is really checked) but change nothing; print each
#               command that would run. tests/test_install.py uses it to prove the demo path never
#               reaches apt or sudo.
#
# Fast when everything is there: apt is only touched for packages dpkg does not report as installed,
# and pip only runs when the requirements declared in setup.py (read from the file, not from stale
# metadata) are unmet or the editable install does not point at this checkout.
#
# Knobs (environment):
#   PYTHON=python3        interpreter to install into (modes without --venv)
#   BASE_PYTHON=python3   interpreter that creates the venv (--venv)
#   SKIP_APT=1            with --system-packages: skip the apt step anyway
#   FORCE_PIP=1           run the pip install even when everything looks satisfied
#   TORCH_REQ             the torch requirement to install when torch is absent or another version
#                         (default: torch==2.13.0+cpu in a venv, so pip can never take PyPI's multi-GB
#                         CUDA build there; torch==2.13.0 otherwise, as constraints.txt pins it)
#   TORCH_INDEX_URL       extra index tried when pip's configured sources (pip.conf, PIP_FIND_LINKS) do
#                         not hold TORCH_REQ (default: PyTorch's CPU index; a GPU venv wants e.g. its cu128
#                         index together with TORCH_REQ=torch==2.13.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"

TORCH_PIN="2.13.0"
# SLURM and Docker tests; python3-venv so that tests/test_install.py can take the demo's venv path
# with the system python3 as a non-root user.
APT_PACKAGES=(slurmctld slurmd slurm-client munge docker.io debootstrap iproute2 procps python3-venv)

log() { echo "install.sh: $*"; }
die() {
  echo "install.sh: ERROR: $*" >&2
  exit 1
}

VENV=""
SYSTEM_PACKAGES=0
KEEP_TORCH=0
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv)
      [ $# -ge 2 ] && [ -n "$2" ] || die "--venv needs a directory (e.g. --venv .venv)"
      VENV="$2"
      shift 2
      ;;
    --venv=*)
      VENV="${1#--venv=}"
      [ -n "$VENV" ] || die "--venv needs a directory (e.g. --venv .venv)"
      shift
      ;;
    --system-packages) SYSTEM_PACKAGES=1; shift ;;
    --keep-torch) KEEP_TORCH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *) die "unknown argument '$1' (see tools/install.sh --help)" ;;
  esac
done
if [ -n "$VENV" ] && [ "$SYSTEM_PACKAGES" = "1" ]; then
  die "--venv and --system-packages do not mix: the venv path (make demo) never touches the system"
fi

# Every command that changes something goes through run(): --dry-run prints it instead.
run() {
  if [ "$DRY_RUN" = "1" ]; then
    log "would run: $*"
  else
    "$@"
  fi
}

# ---- 1. system packages (only with --system-packages, i.e. `make test`)
if [ "$SYSTEM_PACKAGES" = "1" ]; then
  log "system packages: the SLURM and Docker tests need ${APT_PACKAGES[*]} (apt: root or sudo)"
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
      log "apt: all present"
    else
      SUDO=()
      if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "apt packages missing (${missing[*]}), not root and no sudo:" \
          "run \`make test\` as root, or SKIP_APT=1 to skip them (the SLURM and Docker tests then fail)." \
          "\`make demo\` needs none of them."
        SUDO=(sudo)
      fi
      log "apt: installing ${missing[*]}"
      run "${SUDO[@]}" apt-get update -qq
      run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"
      log "apt: installed ${missing[*]}"
    fi
  fi
fi

# ---- 2. the interpreter: a venv in the checkout (no root), or the one given
if [ -n "$VENV" ]; then
  case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
  BASE_PYTHON="${BASE_PYTHON:-python3}"
  PYTHON="$VENV/bin/python"
  TORCH_REQ="${TORCH_REQ:-torch==${TORCH_PIN}+cpu}"
  TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
  if [ -x "$PYTHON" ] && "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    log "venv: reusing $VENV ($("$PYTHON" --version 2>&1))"
  elif [ -e "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
    die "$VENV exists but holds no working Python >= 3.11 (made by an interpreter since removed?):" \
      "remove it (rm -rf $VENV) and run again"
  else
    command -v "$BASE_PYTHON" >/dev/null || die "'$BASE_PYTHON' not found: set BASE_PYTHON to a Python >= 3.11"
    "$BASE_PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
      || die "$BASE_PYTHON is older than 3.11: set BASE_PYTHON to a Python >= 3.11"
    # Debian/Ubuntu split ensurepip out of python3 into python3-venv: check before creating anything.
    "$BASE_PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
      || die "$BASE_PYTHON cannot create a venv with pip (no ensurepip). On Debian/Ubuntu an" \
        "administrator installs it once: apt-get install python3-venv. Or set BASE_PYTHON to another" \
        "Python >= 3.11 (pyenv, conda), or install into an environment you have (tools/install.sh" \
        "without --venv, see README)."
    log "venv: creating $VENV with $BASE_PYTHON ($("$BASE_PYTHON" --version 2>&1))"
    run "$BASE_PYTHON" -m venv "$VENV"
  fi
else
  PYTHON="${PYTHON:-python3}"
  TORCH_REQ="${TORCH_REQ:-torch==$TORCH_PIN}"
  TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
  command -v "$PYTHON" >/dev/null || die "python interpreter '$PYTHON' not found"
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || die "$PYTHON is older than 3.11"
fi
if [ "$DRY_RUN" = "1" ] && [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then
  log "would install into the new venv: $TORCH_REQ, then -e .[test] under constraints.txt"
  log "dry run: nothing changed"
  exit 0
fi

# ---- 3. torch first, on its own: resolved through deepspeed / megatron-core it would be PyPI's CUDA
#         build (GBs of nvidia-* wheels) on a machine that trains on CPU.
# Metadata, not `import torch`: importing costs seconds and this runs on every `make test`.
torch_version="$("$PYTHON" -c 'from importlib.metadata import version; print(version("torch"))' \
  2>/dev/null || true)"
pins=(-c constraints.txt)
if [ "$KEEP_TORCH" = "1" ]; then
  [ -n "$torch_version" ] || die "--keep-torch: $PYTHON has no torch to keep"
  keep="$(mktemp)"
  trap 'rm -f "$keep"' EXIT
  echo "torch==$torch_version" >"$keep"
  # constraints.txt's own pin would conflict with a different kept torch: use only the kept one.
  pins=(-c "$keep")
  log "pip: keeping torch $torch_version (--keep-torch)"
elif "$PYTHON" - "$torch_version" "$TORCH_REQ" <<'PY' 2>/dev/null; then
import sys
from packaging.requirements import Requirement
sys.exit(0 if Requirement(sys.argv[2]).specifier.contains(sys.argv[1], prereleases=True) else 1)
PY
  log "pip: torch $torch_version already installed (satisfies $TORCH_REQ)"
else
  log "pip: torch is '${torch_version:-absent}', installing $TORCH_REQ"
  if [ "$DRY_RUN" = "1" ]; then
    log "would run: $PYTHON -m pip install -q -c constraints.txt $TORCH_REQ"
  elif ! "$PYTHON" -m pip install -q -c constraints.txt "$TORCH_REQ"; then
    [ -n "$TORCH_INDEX_URL" ] || die "pip found no $TORCH_REQ (set TORCH_INDEX_URL to an index that has it)"
    log "pip: not in pip's configured sources; trying $TORCH_INDEX_URL"
    "$PYTHON" -m pip install -q -c constraints.txt --extra-index-url "$TORCH_INDEX_URL" "$TORCH_REQ" \
      || die "could not install $TORCH_REQ: set TORCH_INDEX_URL to a reachable PyTorch CPU index or" \
        "mirror, or PIP_FIND_LINKS to a folder holding torch-${TORCH_PIN}+cpu-*.whl"
  fi
fi

# ---- 4. this package (editable) + test extras, only when something is unmet
check_installed() {
  "$PYTHON" - "$REPO" <<'PY'
import json
import sys
from importlib import metadata
from pathlib import Path

try:
    import setuptools
    from packaging.requirements import Requirement
except ImportError as e:  # a fresh venv has neither until the first install
    print(f"install.sh:   unmet: {e.name} (needed to read setup.py) is not importable")
    sys.exit(1)

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
for p in problems[:5]:  # a fresh venv misses everything: the first few say enough
    print(f"install.sh:   unmet: {p}")
if len(problems) > 5:
    print(f"install.sh:   ... and {len(problems) - 5} more")
sys.exit(1 if problems else 0)
PY
}

if [ "${FORCE_PIP:-0}" != "1" ] && check_installed; then
  log "pip: diffmoe-dist (editable) and all requirements already satisfied"
else
  log "pip: DS_BUILD_OPS=0 pip install ${pins[*]} -e .[test]"
  run env DS_BUILD_OPS=0 "$PYTHON" -m pip install -q "${pins[@]}" -e ".[test]"
  [ "$DRY_RUN" = "1" ] || check_installed || die "requirements still unmet after pip install"
  # pyenv only creates shims for new console scripts (diffmoe-demo, ...) on rehash.
  if [ -z "$VENV" ] && command -v pyenv >/dev/null; then run pyenv rehash; fi
fi

# ---- 4b. torch-fidelity's InceptionV3 (FID) without its torchvision dependency: PyPI's torchvision
#          does not import beside this torch, and the Inception module itself is pure torch.
if ! "$PYTHON" -c 'from importlib.metadata import version; assert version("torch-fidelity") == "0.4.0"' 2>/dev/null; then
  log "pip: torch-fidelity==0.4.0 --no-deps"
  run "$PYTHON" -m pip install -q "${pins[@]}" --no-deps "torch-fidelity==0.4.0"
fi

if [ "$DRY_RUN" = "1" ]; then
  log "dry run: nothing changed"
  exit 0
fi

# ---- 5. verify: the torch pin survived (a CPU build where one was asked for), and the package
#         imports from this checkout
if [ "$KEEP_TORCH" = "1" ]; then
  want="$torch_version"
else
  want="$TORCH_PIN"
fi
cpu_only=0
if [[ "$TORCH_REQ" == *+cpu* ]] && [ "$KEEP_TORCH" != "1" ]; then cpu_only=1; fi
# One interpreter start (importing torch takes seconds): a rerun of `make demo` stays quick.
(cd / && "$PYTHON" - "$want" "$cpu_only" "$REPO" <<'PY') || die "verification failed (see above)"
import pathlib
import sys

import torch

import diffmoe_dist

want, cpu_only, repo = sys.argv[1], sys.argv[2] == "1", pathlib.Path(sys.argv[3]).resolve()
if not torch.__version__.startswith(want):
    sys.exit(f"torch is {torch.__version__}, not {want} (something replaced it; see constraints.txt)")
if cpu_only and torch.version.cuda is not None:
    sys.exit(f"a CUDA torch ({torch.version.cuda}) is installed where a CPU build was asked for")
where = pathlib.Path(diffmoe_dist.__file__).resolve().parents[1]
if where != repo:
    sys.exit(f"diffmoe_dist imports from {where}, not {repo}")
print(f"install.sh: ok: torch {torch.__version__}, diffmoe_dist from {repo} (python: {sys.executable})")
PY
