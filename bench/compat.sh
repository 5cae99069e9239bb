#!/usr/bin/env bash
# Prove the declared torch range: the floor and the newest installable torch each get a
# virtualenv of their own (outside the repository), this package with its test extra,
# and a full run of the test suite.
#
#   bench/compat.sh                  # the floor (2.9.1) and the newest torch pip will install
#   bench/compat.sh 2.9.1 2.14.1     # given versions; "newest" means what pip picks unpinned
#
# Environment: COMPAT_VENVS (where the virtualenvs go; default ${TMPDIR:-/tmp}/ddpfault-compat),
# PYTHON (the interpreter to build them from; default python3), PYTEST_ARGS (extra pytest
# arguments). A virtualenv that already holds the wanted torch is reused, not reinstalled.
#
# These are the registry's default (CUDA) builds: ~5 GB and ~10 minutes to install each,
# so this is not part of every CI run. torch < 2.3 was built against numpy 1.x: numpy<2.
# Prints one line per version ("torch 2.9.1+cu128: 484 passed in ...") and exits non-zero if any
# version's suite failed.
set -u -o pipefail

FLOOR=2.9.1
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENVS=${COMPAT_VENVS:-${TMPDIR:-/tmp}/ddpfault-compat}
PYTHON=${PYTHON:-python3}
[ $# -gt 0 ] || set -- "$FLOOR" newest
mkdir -p "$VENVS"

summary=()
status=0
for want in "$@"; do
    venv="$VENVS/torch-$want"
    log="$VENVS/torch-$want.log"
    echo "== torch $want: virtualenv $venv, log $log"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv" || { summary+=("torch $want: virtualenv failed"); status=1; continue; }
    fi
    if [ "$want" = newest ]; then
        spec=(torch numpy)
    else
        case "$want" in
            2.0.*|2.1.*|2.2.*) spec=("torch==$want" "numpy<2") ;;
            *) spec=("torch==$want" numpy) ;;
        esac
    fi
    have=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)
    if [ "$want" = newest ] || [ "$have" != "$want" ]; then
        "$venv/bin/pip" install --upgrade "${spec[@]}" >>"$log" 2>&1 \
            || { summary+=("torch $want: install failed (see $log)"); status=1; continue; }
    fi
    (cd "$REPO" && "$venv/bin/pip" install -e ".[test]" >>"$log" 2>&1) \
        || { summary+=("torch $want: installing pytest-ddpfault failed (see $log)"); status=1; continue; }
    got=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
    # shellcheck disable=SC2086
    (cd "$REPO" && "$venv/bin/python" -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-}) 2>&1 \
        | tee -a "$log" | tail -n 1 >"$VENVS/torch-$want.last"
    line=$(cat "$VENVS/torch-$want.last")
    summary+=("torch $got: $line")
    grep -qE "failed|error" <<<"$line" && status=1
    grep -qE "passed" <<<"$line" || status=1
done

echo
printf '%s\n' "${summary[@]}"
exit $status
