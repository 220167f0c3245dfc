#!/usr/bin/env bash
# The stack as users deploy it, for the bench: nginx with the shipped site (nginx/pushgate.conf
# rendered by nginx/render.sh: TLS, HTTP/2, the /socket/ location and its limits) in front of
# one of three backends, all on one core when the bench spawns it (it pins what it starts):
#
#   stack.sh cert DIR                       a test CA and a certificate for "localhost" in DIR
#                                           (ca.pem, fullchain.pem, privkey.pem)
#   stack.sh pushgate TLS_PORT PORT DIR PG  pushgate (binary PG) on 127.0.0.1:PORT behind
#                                           nginx on 127.0.0.1:TLS_PORT (certificate from DIR);
#                                           publishes go to PORT, as the site intends
#   stack.sh nchan TLS_PORT PORT DIR        Nchan's subscriber location in the same server block
#                                           (/sub/<topic>), its publisher on 127.0.0.1:PORT
#   stack.sh hop TLS_PORT PORT DIR BENCH    the floor server (BENCH floor) on 127.0.0.1:PORT,
#                                           proxied at /sub/ with the /socket/ location's
#                                           settings: what the proxy hop itself costs
#   stack.sh edge TLS_PORT PORT DIR PG      pushgate alone, ending TLS itself on
#                                           127.0.0.1:TLS_PORT (tls.cert_file from DIR), API
#                                           and publishes on PORT: nothing in front
#   stack.sh sni TLS_PORT PORT DIR PG       the SNI mode (nginx/pushgate-sni.conf): nginx's
#                                           stream server on TLS_PORT sends "localhost" to
#                                           pushgate's edge (tls.proxy_protocol, on a free
#                                           loopback port) and every other name to the site
#                                           (named site.localhost, on another free
#                                           loopback port)
#
# Example (BENCHMARKS.md, "The stack as deployed"):
#   bench/peers/stack.sh cert /tmp/stack-tls
#   pushgate-bench run idle -n 8000 --per-address 100 --tls-ca /tmp/stack-tls/ca.pem \
#       --server 127.0.0.1:4443 --publish-server 127.0.0.1:4100 \
#       --spawn "bench/peers/stack.sh pushgate 4443 4100 /tmp/stack-tls target/release/pushgate"
#
# STACK_SITE_CONF names another site template to render in place of nginx/pushgate.conf (the
# variants of the site's settings measured in BENCHMARKS.md).
#
# nginx runs as the Debian package configures it (its nginx.conf's settings that matter here:
# one worker as the bench pins one core, access log on, sendfile), with the file limits the
# Ansible role sets, capped at this machine's 20000 per process. Stops everything on SIGTERM.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
mode=${1:?usage: stack.sh cert DIR | pushgate|nchan|hop|edge|sni TLS_PORT PORT DIR [BINARY]}

if [ "$mode" = cert ]; then
    dir=${2:?usage: stack.sh cert DIR}
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
        -subj "/CN=pushgate bench CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
        -keyout "$dir/privkey.pem" -out "$dir/leaf.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$dir/leaf.ext"
    openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 30 -extfile "$dir/leaf.ext" -out "$dir/fullchain.pem" 2>/dev/null
    exit 0
fi

tls_port=${2:?TLS_PORT}
port=${3:?PORT}
tls_dir=${4:?DIR (from stack.sh cert)}
binary=${5:-}

pids=()
stop() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait
    [ -z "${prefix:-}" ] || rm -rf "$prefix"
    exit 0
}
trap stop TERM INT

# pushgate as the one backend the bench spawns: one worker thread, as pinned to one core.
pushgate() {
    [ -x "$binary" ] || { echo "stack.sh: pushgate binary needed" >&2; exit 2; }
    env PUSHGATE_SERVER_WORKER_THREADS=1 "$@" "$binary" serve --listen "127.0.0.1:$port" &
    pids+=($!)
}

if [ "$mode" = edge ]; then
    pushgate PUSHGATE_TLS_LISTEN="127.0.0.1:$tls_port" \
        PUSHGATE_TLS_CERT_FILE="$tls_dir/fullchain.pem" PUSHGATE_TLS_KEY_FILE="$tls_dir/privkey.pem"
    wait -n || true
    stop
fi

prefix=$(mktemp -d /tmp/pushgate-stack.XXXXXX)
mkdir -p "$prefix/conf" "$prefix/logs" "$prefix/tmp" "$prefix/www"
modules=/usr/lib/nginx/modules

# The site exactly as render.sh renders it; the plain-HTTP server and IPv6 listen on unix
# sockets in the prefix (nothing the bench uses, and no more ports to pick). In the SNI mode the
# site is behind the stream server (on a unix socket, with proxy_protocol) under another name.
site_name=localhost
site_https="127.0.0.1:$tls_port"
site_https_v6="unix:$prefix/https6.sock"
stream_include=""
if [ "$mode" = sni ]; then
    # pushgate's edge and the site on free loopback ports (the bench hands out two ports only;
    # nginx's workers, as nobody, could not reach a unix socket in the private prefix).
    free_port() {
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    }
    edge_port=$(free_port)
    site_port=$(free_port)
    site_name=site.localhost
    site_https="127.0.0.1:$site_port proxy_protocol"
    site_https_v6="unix:$prefix/site6.sock proxy_protocol"
    "$repo/nginx/render.sh" \
        socket_server_name=localhost \
        listen_https="127.0.0.1:$tls_port" listen_https_v6="unix:$prefix/sni6.sock" \
        pushgate_tls_upstream="127.0.0.1:$edge_port" site_upstream="127.0.0.1:$site_port" \
        <"$repo/nginx/pushgate-sni.conf" >"$prefix/conf/sni.conf"
    stream_include="load_module $modules/ngx_stream_module.so;
include $prefix/conf/sni.conf;"
fi
"$repo/nginx/render.sh" \
    server_name="$site_name" \
    listen_http="unix:$prefix/http.sock" listen_http_v6="unix:$prefix/http6.sock" \
    listen_https="$site_https" listen_https_v6="$site_https_v6" \
    https_port_suffix=":$tls_port" tls_dir="$tls_dir" static_root="$prefix/www" \
    pushgate_upstream="127.0.0.1:$port" app_upstream="unix:$prefix/app.sock" \
    <"${STACK_SITE_CONF:-$repo/nginx/pushgate.conf}" >"$prefix/conf/site.conf"

# What the other backends add to the same HTTPS server block (after its server_tokens line).
extra=""
main_extra=""
case "$mode" in
pushgate | sni) ;;
nchan)
    main_extra="load_module $modules/ngx_nchan_module.so;"
    extra="
        location ~ ^/sub/(.+)\$ {
            nchan_subscriber websocket longpoll;
            nchan_channel_id \$1;
        }"
    ;;
hop)
    extra="
        location /sub/ {
            proxy_pass http://127.0.0.1:$port;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$pushgate_connection;
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 120s;
            proxy_send_timeout 120s;
            gzip off;
            brotli off;
        }"
    ;;
*)
    echo "stack.sh: unknown mode $mode" >&2
    exit 2
    ;;
esac
if [ -n "$extra" ]; then
    printf '%s\n' "$extra" >"$prefix/conf/extra.conf"
    # The second server_tokens line is the HTTPS server's.
    awk -v inc="    include $prefix/conf/extra.conf;" \
        '{ print } /server_tokens off;/ && ++n == 2 { print inc }' \
        "$prefix/conf/site.conf" >"$prefix/conf/site.tmp"
    mv "$prefix/conf/site.tmp" "$prefix/conf/site.conf"
fi
nchan_publisher=""
if [ "$mode" = nchan ]; then
    # Nchan's publisher, on plain loopback like pushgate's API. Same history as pushgate's
    # defaults: 1000 messages, 5 minutes.
    nchan_publisher="
    nchan_message_buffer_length 1000;
    nchan_message_timeout 300s;
    server {
        listen 127.0.0.1:$port backlog=4096;
        access_log off;
        location ~ ^/pub/(.+)\$ {
            nchan_publisher;
            nchan_channel_id \$1;
        }
    }"
fi

cat >"$prefix/conf/nginx.conf" <<EOF
load_module $modules/ngx_http_brotli_filter_module.so;
load_module $modules/ngx_http_brotli_static_module.so;
$main_extra
$stream_include
worker_processes 1;
worker_rlimit_nofile 20000;
pid $prefix/nginx.pid;
error_log $prefix/logs/error.log warn;
events { worker_connections 19500; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    access_log $prefix/logs/access.log;
    client_body_temp_path $prefix/tmp/body;
    proxy_temp_path $prefix/tmp/proxy;
    fastcgi_temp_path $prefix/tmp/fastcgi;
    uwsgi_temp_path $prefix/tmp/uwsgi;
    scgi_temp_path $prefix/tmp/scgi;
    $nchan_publisher
    include $prefix/conf/site.conf;
}
EOF

case "$mode" in
pushgate) pushgate ;;
sni)
    pushgate PUSHGATE_TLS_LISTEN="127.0.0.1:$edge_port" PUSHGATE_TLS_PROXY_PROTOCOL=true \
        PUSHGATE_TLS_CERT_FILE="$tls_dir/fullchain.pem" PUSHGATE_TLS_KEY_FILE="$tls_dir/privkey.pem"
    ;;
hop)
    [ -x "$binary" ] || { echo "stack.sh: pushgate-bench binary needed" >&2; exit 2; }
    "$binary" floor --listen "127.0.0.1:$port" &
    pids+=($!)
    ;;
esac
nginx -p "$prefix" -e "$prefix/logs/error.log" -c "$prefix/conf/nginx.conf" -g 'daemon off;' &
pids+=($!)
# Whichever stops first takes the rest with it.
wait -n || true
stop
