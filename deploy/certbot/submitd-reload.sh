#!/bin/sh
# certbot deploy hook for submitd: copy a freshly issued or renewed certificate into
# /etc/submitd/tls and have the running server load it (SIGHUP through `systemctl reload`).
# Sessions already open are not disturbed; new connections get the new certificate.
#
# Install (docs/install.md, "Certificates from Let's Encrypt"):
#   install -m 0755 deploy/certbot/submitd-reload.sh /usr/local/sbin/submitd-reload.sh
#   certbot certonly --standalone -d mail.example.org \
#       --deploy-hook /usr/local/sbin/submitd-reload.sh
# Given with --deploy-hook, certbot remembers the hook for this certificate only and runs it
# after every renewal (and after the first issue). Placed in
# /etc/letsencrypt/renewal-hooks/deploy/ instead, it runs for every certificate on the
# machine: then set SUBMITD_CERT_NAME below to the one certificate submitd uses.
#
# certbot sets RENEWED_LINEAGE (e.g. /etc/letsencrypt/live/mail.example.org). Written files:
#   $SUBMITD_TLS_DIR/fullchain.pem  certificate and intermediates, mode 0644
#   $SUBMITD_TLS_DIR/privkey.pem    private key, mode 0640, group $SUBMITD_GROUP
# matching the sample configuration's [tls] cert = "tls/fullchain.pem", key = "tls/privkey.pem".
# Each file is replaced in one rename, so the server never reads half a file.

set -eu

: "${SUBMITD_TLS_DIR:=/etc/submitd/tls}"     # where [tls] cert and key point
: "${SUBMITD_GROUP:=submitd}"                # the group the server runs as
: "${SUBMITD_UNIT:=submitd.service}"
: "${SUBMITD_CERT_NAME:=}"                   # empty: act for whichever certificate called us

if [ -z "${RENEWED_LINEAGE:-}" ]; then
    echo "submitd-reload.sh: RENEWED_LINEAGE is not set; run me as a certbot deploy hook" >&2
    exit 2
fi
if [ -n "$SUBMITD_CERT_NAME" ] && [ "$(basename "$RENEWED_LINEAGE")" != "$SUBMITD_CERT_NAME" ]; then
    exit 0  # another certificate on this machine, not submitd's
fi
for name in fullchain.pem privkey.pem; do
    if [ ! -r "$RENEWED_LINEAGE/$name" ]; then
        echo "submitd-reload.sh: cannot read $RENEWED_LINEAGE/$name" >&2
        exit 1
    fi
done

umask 077
if [ ! -d "$SUBMITD_TLS_DIR" ]; then  # first run: a directory the server's group may enter
    mkdir -p "$SUBMITD_TLS_DIR"
    chgrp "$SUBMITD_GROUP" "$SUBMITD_TLS_DIR"
    chmod 0750 "$SUBMITD_TLS_DIR"
fi

# install_file SOURCE NAME MODE: copy next to the target, set mode and group, then rename.
install_file() {
    tmp="$SUBMITD_TLS_DIR/.$2.new"
    rm -f "$tmp"
    cp "$1" "$tmp"
    chgrp "$SUBMITD_GROUP" "$tmp"
    chmod "$3" "$tmp"
    mv -f "$tmp" "$SUBMITD_TLS_DIR/$2"
}

install_file "$RENEWED_LINEAGE/privkey.pem" privkey.pem 0640
install_file "$RENEWED_LINEAGE/fullchain.pem" fullchain.pem 0644

# Reload if the server runs; if it does not, it reads the new files when it starts.
if ! systemctl try-reload-or-restart "$SUBMITD_UNIT"; then
    echo "submitd-reload.sh: the new certificate is in $SUBMITD_TLS_DIR, but $SUBMITD_UNIT" \
        "could not be reloaded; run: systemctl reload $SUBMITD_UNIT" >&2
    exit 1
fi
echo "submitd-reload.sh: installed $(basename "$RENEWED_LINEAGE") into $SUBMITD_TLS_DIR, reload of $SUBMITD_UNIT requested"
