# shellcheck shell=bash disable=SC2034  # run_dir_args is used by the sourcing launcher
# Shared checks of the single-node launchers (sourced; expects `die` to be defined by the caller).

# run_dir_args: `--set run.dir=$RUN_DIR` when RUN_DIR is set, after checking the directory can be
# created and written, so a bad path fails here with a message instead of inside every rank.
run_dir_args=()
if [[ -n ${RUN_DIR:-} ]]; then
  mkdir -p "$RUN_DIR" 2>/dev/null || die "cannot create run dir '$RUN_DIR'"
  probe=$(mktemp -p "$RUN_DIR" .write-probe.XXXXXX 2>/dev/null) || die "run dir '$RUN_DIR' is not writable"
  rm -f "$probe"
  run_dir_args=(--set "run.dir=$RUN_DIR")
fi
