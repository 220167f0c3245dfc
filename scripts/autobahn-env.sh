#!/usr/bin/env bash
# Prints the path of Autobahn|Testsuite's `wstest`, making its virtualenv first when missing.
#
# The suite runs on Python 2.7 only. It comes from pyenv (PYTHON2 overrides where to find it),
# and the virtualenv, with every dependency pinned to versions that still support 2.7, is cached
# under PUSHGATE_TEST_CACHE (default /var/cache/pushgate-test) and remade when the pins change.
# Everything but the path goes to stderr.
set -euo pipefail

CACHE=${PUSHGATE_TEST_CACHE:-/var/cache/pushgate-test}
PINS="txaio==2.1.0 incremental==16.10.1 pyOpenSSL==19.1.0 cryptography==3.3.2 Twisted==19.10.0
zope.interface==4.6.0 jinja2==2.11.3 markupsafe==1.1.1 Werkzeug==1.0.1 klein==17.10.0
service_identity==18.1.0 unittest2==1.1.0 six==1.16.0 autobahn[twisted,accelerate]==0.10.9
setuptools==44.0.0 autobahntestsuite==25.10.1"
STAMP=$(printf '%s' "$PINS" | sha256sum | cut -c1-16)
DIR="$CACHE/autobahn-$STAMP"

if [ ! -f "$DIR/ready" ]; then
    python2=${PYTHON2:-}
    if [ -z "$python2" ]; then
        root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
        python2=$(ls -d "$root"/versions/2.7*/bin/python2.7 2>/dev/null | tail -1 || true)
    fi
    if [ -z "$python2" ] || [ ! -x "$python2" ]; then
        echo "autobahn-env: Autobahn|Testsuite needs Python 2.7 (pyenv's 2.7.18, or set PYTHON2)" >&2
        exit 1
    fi
    echo "==> making the Autobahn|Testsuite virtualenv in $DIR (cached for later runs)" >&2
    rm -rf "$DIR"
    mkdir -p "$DIR"
    # virtualenv < 20.22 is the last that makes Python 2.7 environments.
    python3 -m venv "$DIR/py3" >&2
    "$DIR/py3/bin/pip" install -q "virtualenv<20.22" >&2
    "$DIR/py3/bin/virtualenv" -q -p "$python2" "$DIR/py2" >&2
    # shellcheck disable=SC2086 # one word per pin
    "$DIR/py2/bin/pip" install -q --no-python-version-warning $PINS >&2
    "$DIR/py2/bin/wstest" --help >/dev/null
    touch "$DIR/ready"
fi
echo "$DIR/py2/bin/wstest"
