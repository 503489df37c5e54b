#!/bin/sh
# `make install` (and `make deb`, into a staging root): the binaries, the
# systemd units (the exporter's; the forwarder's service, socket and spool
# drop-in), their environment files, the optional drop-ins, the operator
# docs, the alert rules and dashboard, the man pages and the shell
# completions.
#
#   PREFIX      /usr/local   binaries in PREFIX/bin, docs in PREFIX/share/doc/xtcp
#   SYSCONFDIR  /etc         the environment files in SYSCONFDIR/xtcp/
#   UNITDIR     PREFIX/lib/systemd/system
#   DESTDIR     (empty)      staging root for packaging; paths inside the
#                            unit stay without it
#   BIN_DIR     target/release  where the built binaries are
#
# An existing environment file is never overwritten: the new one is put
# beside it as NAME.env.new.
set -eu
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/usr/local}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
DESTDIR=${DESTDIR:-}
BIN_DIR=${BIN_DIR:-target/release}
DOCDIR=$PREFIX/share/doc/xtcp

for bin in xtcp xtcp-forwarder xtcp-debug-server xtcp-top; do
    install -D -m 0755 "$BIN_DIR/$bin" "$DESTDIR$PREFIX/bin/$bin"
done

# The units, with the paths inside them for PREFIX and SYSCONFDIR.
unit=$(mktemp)
trap 'rm -f "$unit"' EXIT
for name in xtcp.service xtcp-forwarder.service xtcp-forwarder.socket; do
    sed -e "s#/usr/local/bin/xtcp#$PREFIX/bin/xtcp#" \
        -e "s#/usr/local/share/doc/xtcp#$DOCDIR#" \
        -e "s#/etc/xtcp/#$SYSCONFDIR/xtcp/#" \
        "bundle/systemd/$name" >"$unit"
    install -D -m 0644 "$unit" "$DESTDIR$UNITDIR/$name"
done
# The forwarder's spool, on unless this drop-in is removed.
install -D -m 0644 bundle/systemd/spool.conf \
    "$DESTDIR$UNITDIR/xtcp-forwarder.service.d/spool.conf"

for env in xtcp forwarder; do
    env_file=$DESTDIR$SYSCONFDIR/xtcp/$env.env
    if [ -e "$env_file" ]; then
        install -D -m 0644 "bundle/systemd/$env.env" "$env_file.new"
        echo "kept $env_file; the shipped one is $env_file.new"
    else
        install -D -m 0644 "bundle/systemd/$env.env" "$env_file"
    fi
done

for drop_in in net-admin netns feed-key; do
    install -D -m 0644 "bundle/systemd/$drop_in.conf" "$DESTDIR$DOCDIR/$drop_in.conf"
done
# The Prometheus alert rules (with their promtool tests) and the Grafana
# dashboard of the per-service aggregates.
for file in prometheus/xtcp-alerts.yml prometheus/xtcp-alerts.test.yml \
    grafana/xtcp-services.json; do
    install -D -m 0644 "bundle/$file" "$DESTDIR$PREFIX/share/xtcp/$file"
done
for doc in operations metrics flags record filter kafka lifecycle; do
    install -D -m 0644 "docs/$doc.md" "$DESTDIR$DOCDIR/$doc.md"
done

# Man pages and shell completions, made by each program from its flags.
SHARE=$DESTDIR$PREFIX/share
for bin in xtcp xtcp-forwarder xtcp-debug-server xtcp-top; do
    mkdir -p "$SHARE/man/man1" "$SHARE/bash-completion/completions" \
        "$SHARE/zsh/vendor-completions" "$SHARE/fish/vendor_completions.d"
    "$BIN_DIR/$bin" --man | gzip -9n >"$SHARE/man/man1/$bin.1.gz"
    "$BIN_DIR/$bin" --completions bash >"$SHARE/bash-completion/completions/$bin"
    "$BIN_DIR/$bin" --completions zsh >"$SHARE/zsh/vendor-completions/_$bin"
    "$BIN_DIR/$bin" --completions fish >"$SHARE/fish/vendor_completions.d/$bin.fish"
done

echo "installed xtcp under $DESTDIR$PREFIX; units $DESTDIR$UNITDIR/xtcp.service, xtcp-forwarder.service and .socket"
echo "next: systemctl daemon-reload && systemctl enable --now xtcp (and xtcp-forwarder.socket xtcp-forwarder)"
