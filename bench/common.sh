# Shared by bench/run and bench/pgo-build (sourced, not run).

# Installs from Debian whatever the harness needs and is missing: the servers it compares, the
# load generators and openssl (certificates, handshake load).
bench_install_tools() {
    # Command -> Debian package that provides it.
    local -A packages=(
        [nginx]=nginx-light
        [h2o]=h2o
        [h2load]=nghttp2-client
        [wrk]=wrk
        [openssl]=openssl
        [taskset]=util-linux
        [python3]=python3
    )
    local missing=() cmd
    for cmd in "${!packages[@]}"; do
        # nginx lives in /usr/sbin, which a non-login shell may not have on its PATH.
        if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
            missing+=("${packages[$cmd]}")
        fi
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "bench: installing ${missing[*]}" >&2
        bench_apt_install "${missing[@]}"
    fi
    export PATH="$PATH:/usr/sbin:/sbin"
}

bench_apt_install() {
    local sudo=
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    # policy-rc.d (containers) or a missing init keeps the packaged services from starting;
    # either way the harness runs its own instances with its own configurations.
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

bench_need_two_cpus() {
    if [ "$(nproc)" -lt 2 ]; then
        echo "bench: needs at least 2 CPUs (server on CPU 0, load generator on CPU 1); this machine has $(nproc)" >&2
        exit 1
    fi
}

# The cargo target directory, absolute (honours CARGO_TARGET_DIR).
bench_target_dir() {
    local dir="${CARGO_TARGET_DIR:-$1/target}"
    case "$dir" in
        /*) echo "$dir" ;;
        *) echo "$1/$dir" ;;
    esac
}

# Builds bench/hyper-baseline (hyper alone, the floor) with gatehouse's Cargo.lock, so that hyper,
# h2, tokio and the allocator are the versions gatehouse runs; prints the binary's path.
bench_build_hyper_baseline() {
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    cp "$here/../Cargo.lock" "$here/hyper-baseline/Cargo.lock"
    (cd "$here/hyper-baseline" && CARGO_TARGET_DIR="$here/hyper-baseline/target" cargo build --release --quiet)
    echo "$here/hyper-baseline/target/release/hyper-baseline"
}
