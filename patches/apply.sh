#!/usr/bin/env bash
# Apply the Lighthouse hook (megatron_lm_lighthouse.patch) to a Megatron-LM checkout: pretrain_gpt.py and, where
# the checkout has it, pretrain_hybrid.py.
# Usage: patches/apply.sh MEGATRON_LM_DIR
#   Checks the checkout's commit against those the patch was verified on (a different commit is allowed
#   if the patch still applies cleanly), runs `git apply --check` for each script before touching anything, and
#   leaves a script that already carries the hook alone. Exit codes: 0 applied or already applied, 2 bad usage,
#   3 the patch does not apply (nothing was changed).
set -euo pipefail
VERIFIED_COMMIT=d98e8a64ddf34856e74b24714e3bedb2f5a39553  # main; keep in sync with patches/README.md
VERIFIED_TAG_COMMIT=5be9626709af2722333bf54797c954c09edeada3  # core_v0.19.0; likewise
HERE=$(cd "$(dirname "$0")" && pwd)
PATCH="$HERE/megatron_lm_lighthouse.patch"
die() { echo "error: $*" >&2; exit "${2:-2}"; }

[ $# -eq 1 ] || die "usage: $0 MEGATRON_LM_DIR   (a Megatron-LM checkout containing pretrain_gpt.py)"
DIR=$1
[ -d "$DIR" ] || die "MEGATRON_LM_DIR=$DIR: no such directory"
[ -f "$DIR/pretrain_gpt.py" ] || die "MEGATRON_LM_DIR=$DIR: no pretrain_gpt.py there (not a Megatron-LM checkout)"
command -v git >/dev/null || die "git is needed (git apply)"

if head=$(git -C "$DIR" rev-parse HEAD 2>/dev/null); then
    if [ "$head" = "$VERIFIED_COMMIT" ] || [ "$head" = "$VERIFIED_TAG_COMMIT" ]; then
        echo "Megatron-LM at $head: a commit this patch was verified on"
    else
        echo "warning: Megatron-LM at $head; the patch was verified on $VERIFIED_COMMIT (main) and" \
             "$VERIFIED_TAG_COMMIT (core_v0.19.0) (trying it anyway)" >&2
    fi
else
    echo "warning: $DIR is not a git checkout; cannot check its commit (verified on $VERIFIED_COMMIT and" \
         "$VERIFIED_TAG_COMMIT)" >&2
fi

cd "$DIR"
todo=()
for script in pretrain_gpt.py pretrain_hybrid.py; do
    if [ ! -f "$script" ]; then
        echo "note: no $script in $DIR (a Megatron-LM without HybridModel): its hook is left out" >&2
        continue
    fi
    if git apply --reverse --check --include="$script" "$PATCH" 2>/dev/null; then
        echo "already applied: $DIR/$script carries the Lighthouse hook"
        continue
    fi
    if report=$(git apply --check --verbose --include="$script" "$PATCH" 2>&1); then
        todo+=("$script")
        continue
    fi
    echo "$report" >&2
    cat >&2 <<MSG
error: the patch does not apply to $DIR/$script (nothing was changed).
  This Megatron-LM differs from the verified commit around the hook lines. Either
  - check out the verified commit:  git -C $DIR checkout $VERIFIED_COMMIT   and rerun this script, or
  - try a three-way merge:          git -C $DIR apply --3way $PATCH   and resolve what it marks, or
  - add the four hook lines by hand (patches/README.md lists them: the import, the extra_args_provider,
    start_lighthouse(args, model_cfg, ...) once the model config exists, maybe_switch_to_dense in
    forward_step), then check the result on CPU: python patches/check_patched.py $DIR, or
  - on a Megatron-LM older than 0.19 (whose pretrain_gpt.py has no model_cfg), use no patch: the unpatched
    route, --spec megatron_lighthouse.env_spec lighthouse_layer_spec with LIGHTHOUSE_* variables, which the
    examples take on their own for an unpatched checkout (no in-run switch, no monitor flags).
MSG
    exit 3
done
if [ "${#todo[@]}" = 0 ]; then
    echo "nothing to do"
    exit 0
fi
git apply "${todo[@]/#/--include=}" "$PATCH"
echo "applied to ${todo[*]}: $PATCH (check it on CPU: python $HERE/check_patched.py $DIR)"
echo "  they now take --lighthouse, --lighthouse-topk, --lighthouse-pooling-factor, --lighthouse-levels,"
echo "  --lighthouse-dense-layers, --lighthouse-rope, --lighthouse-dense-from-iteration and --lighthouse-monitor (see examples/)."
python3 -c "import megatron_lighthouse" 2>/dev/null \
    || echo "warning: megatron_lighthouse is not importable by python3 here; install it (pip install -e .) in the training environment" >&2
