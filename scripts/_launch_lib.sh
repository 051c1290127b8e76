# Shared functions of launch_cpu.sh and launch_torchrun.sh (sourced, not run). has_arg and
# arg_value read the caller's array ARGS (the fairseq arguments). launch_slurm.sh keeps its own
# copy of them: sbatch runs a copy of that script from a spool directory, away from this file.

# need_positive_int NAME VALUE: exit 2 with a message unless VALUE is a positive integer
need_positive_int() {
    if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
        echo "$(basename "$0"): $1 must be a positive integer, got '$2'" >&2
        exit 2
    fi
}

# fairseq_module CMD: the fairseq_cli module of a module or console script name (fairseq-eval-lm -> eval_lm)
fairseq_module() {
    local m=${1#fairseq-}
    echo "${m//-/_}"
}

# has_arg FLAG: ARGS holds FLAG or FLAG=...
has_arg() { local a; for a in "${ARGS[@]}"; do [[ "$a" == "$1" || "$a" == "$1="* ]] && return 0; done; return 1; }

# arg_value FLAG DEFAULT: value of FLAG X or FLAG=X in ARGS (the last one wins), else DEFAULT
arg_value() {
    local i v="$2"
    for ((i = 0; i < ${#ARGS[@]}; i++)); do
        case "${ARGS[$i]}" in
            "$1") v="${ARGS[$((i + 1))]:-}" ;;
            "$1="*) v="${ARGS[$i]#*=}" ;;
        esac
    done
    echo "$v"
}
