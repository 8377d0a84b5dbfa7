# The files of a POOL installation, laid out under a root directory: used
# by scripts/build-deb (into the package tree) and scripts/install (into /).
# Paths here are the ones docs/operations.md lists under "Installed files".
#
#   stage_pool ROOT POOL_BINARY SHIM_LIBRARY

stage_pool() {
    local root=$1 bin=$2 shim=$3
    local repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    install -D -m 0755 "$bin" "$root/usr/bin/pool"
    install -D -m 0644 "$shim" "$root/usr/lib/pool/libpool_shim.so"
    local unit
    for unit in pool.service pool-relay.service pool-bridge@.service; do
        install -D -m 0644 "$repo/dist/systemd/$unit" "$root/usr/lib/systemd/system/$unit"
    done
    install -D -m 0640 "$repo/dist/pool.toml" "$root/etc/pool/pool.toml"
    # Man pages and completions come from the command definition itself.
    local tmp
    tmp=$(mktemp -d)
    "$root/usr/bin/pool" man "$tmp" >/dev/null
    install -d "$root/usr/share/man/man1"
    local page
    for page in "$tmp"/*.1; do
        gzip -9n -c "$page" >"$root/usr/share/man/man1/$(basename "$page").gz"
        chmod 0644 "$root/usr/share/man/man1/$(basename "$page").gz"
    done
    rm -rf "$tmp"
    install -d "$root/usr/share/bash-completion/completions" \
        "$root/usr/share/zsh/vendor-completions" "$root/usr/share/fish/vendor_completions.d"
    "$root/usr/bin/pool" completions bash >"$root/usr/share/bash-completion/completions/pool"
    "$root/usr/bin/pool" completions zsh >"$root/usr/share/zsh/vendor-completions/_pool"
    "$root/usr/bin/pool" completions fish >"$root/usr/share/fish/vendor_completions.d/pool.fish"
    chmod 0644 "$root/usr/share/bash-completion/completions/pool" \
        "$root/usr/share/zsh/vendor-completions/_pool" "$root/usr/share/fish/vendor_completions.d/pool.fish"
    local doc=$root/usr/share/doc/pool
    install -d "$doc/grafana" "$doc/prometheus"
    local f
    for f in README.md CHANGELOG.md; do
        install -m 0644 "$repo/$f" "$doc/$f"
    done
    for f in operations.md journal.md relay.md config.md shim.md security.md pool.example.toml; do
        install -m 0644 "$repo/docs/$f" "$doc/$f"
    done
    install -m 0644 "$repo"/dist/grafana/*.json "$doc/grafana/"
    install -m 0644 "$repo"/dist/prometheus/*.yml "$doc/prometheus/"
    printf 'POOL\nLicense: MIT OR Apache-2.0\n' >"$doc/copyright"
    chmod 0644 "$doc/copyright"
}
