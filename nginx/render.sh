#!/usr/bin/env bash
# Renders the nginx site template: nginx/render.sh [NAME=VALUE ...] < pushgate.conf > site.conf
# (and the SNI mode's stream server: nginx/render.sh [...] < pushgate-sni.conf > sni.conf).
#
# Variables and their defaults (for a droplet serving example.com):
#   server_name        example.com            names this site answers to (space-separated)
#   listen_http        80                     plain HTTP listen address (IPv4)
#   listen_http_v6     [::]:80                plain HTTP listen address (IPv6)
#   listen_https       443                    HTTPS listen address (IPv4)
#   listen_https_v6    [::]:443               HTTPS listen address (IPv6)
#                                             (the edge mode, README: the site's own address,
#                                             e.g. listen_http=203.0.113.10:80
#                                             listen_https=203.0.113.10:443, leaving the
#                                             socket address's ports to pushgate's tls.listen)
#   https_port_suffix  (empty)                ":8443" when HTTPS is not on 443 (redirects)
#   tls_dir            /var/lib/pushgate/tls  where pushgate writes fullchain.pem, privkey.pem
#   static_root        /var/www/app           your static files
#   pushgate_upstream  127.0.0.1:4000         pushgate (pushgate.socket's ListenStream=)
#   app_upstream       127.0.0.1:3000         your app
#   socket_proxy_buffer_size 2k               nginx's buffer each way per proxied socket
#                                             (1k: less memory per idle socket, more CPU for
#                                             messages above 1 KiB and under load; the
#                                             comment in pushgate.conf has the figures)
# Only in pushgate-sni.conf (the SNI mode):
#   socket_server_name socket.example.com     the name routed to pushgate's own TLS edge
#   pushgate_tls_upstream 127.0.0.1:4443      pushgate's tls.listen (with tls.proxy_protocol)
#   site_upstream      127.0.0.1:8443         where the site's HTTPS server listens, rendered
#                                             with listen_https="127.0.0.1:8443 proxy_protocol"
#                                             and listen_https_v6="[::1]:8443 proxy_protocol"
#
# Fails on an unknown name and on any {{ ... }} left unfilled.
set -euo pipefail

declare -A v=(
    [server_name]=example.com
    [listen_http]=80
    [listen_http_v6]='[::]:80'
    [listen_https]=443
    [listen_https_v6]='[::]:443'
    [https_port_suffix]=''
    [tls_dir]=/var/lib/pushgate/tls
    [static_root]=/var/www/app
    [pushgate_upstream]=127.0.0.1:4000
    [app_upstream]=127.0.0.1:3000
    [socket_proxy_buffer_size]=2k
    [socket_server_name]=socket.example.com
    [pushgate_tls_upstream]=127.0.0.1:4443
    [site_upstream]=127.0.0.1:8443
)
for arg in "$@"; do
    name=${arg%%=*}
    if [[ "$arg" != *=* || -z "${v[$name]+set}" ]]; then
        echo "render.sh: unknown variable in '$arg' (known: ${!v[*]})" >&2
        exit 2
    fi
    v[$name]=${arg#*=}
done

text=$(cat)
for name in "${!v[@]}"; do
    text=${text//"{{ $name }}"/"${v[$name]}"}
done
if left=$(grep -o '{{[^}]*}}' <<<"$text"); then
    echo "render.sh: unfilled: $left" >&2
    exit 2
fi
printf '%s\n' "$text"
