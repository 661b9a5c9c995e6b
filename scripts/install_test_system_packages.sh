#!/usr/bin/env bash
# System packages the tests drive for real, from Debian: chromium (the page's browser tests), postgresql (the
# tracking stack's tests) and bubblewrap (the HumanEval sandbox's box, jobs/sandbox). Installs only what is missing;
# without root or sudo it names the command and goes on (those tests then skip, except under CI where the browser and
# sandbox tests fail).
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v bwrap >/dev/null || missing+=(bubblewrap)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then sudo=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo); else
  echo "note: tests that need ${missing[*]} will skip: install with 'sudo apt-get install -y ${missing[*]}'" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq "${missing[@]}"
