# Shared by scripts/serve and scripts/test.

# Install the named Debian packages that are missing (apt-get as root, else via sudo).
ensure_debian_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Create .venv (once) with a current pip.
make_venv() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
        .venv/bin/pip install --quiet --upgrade pip
    fi
}

# What tests/deploy/test_real_image.py builds the container image from, so that the build itself
# needs no network: a base image's root file system made from Debian packages (the
# machine's own apt sources) and wheels of the project and everything it installs. Into
# build/image-test/; the root file system is made once and kept.
prepare_image_inputs() {
    local dir=build/image-test
    mkdir -p "$dir"
    if [ ! -f "$dir/rootfs.tar" ]; then
        echo "making the test base image's root file system (mmdebstrap, ~30 s)" >&2
        rm -rf "$dir/rootfs.partial"
        # --format: the output's name does not end in .tar until it is complete.
        mmdebstrap --quiet --variant=minbase --mode=root --format=tar \
            --include=python3,python3-venv,ca-certificates \
            bookworm "$dir/rootfs.partial"
        mv "$dir/rootfs.partial" "$dir/rootfs.tar"
    fi
    rm -rf "$dir/wheels"
    # setuptools builds the project inside the image (pip install .); async-timeout is what
    # redis needs on bookworm's Python 3.11.2 (a marker this venv's Python does not meet).
    .venv/bin/pip wheel --quiet --wheel-dir "$dir/wheels" . 'setuptools>=68' wheel \
        'async-timeout>=4.0.3'
    printf '[global]\nno-index = true\nfind-links = /wheels\n' > "$dir/pip.conf"
}
