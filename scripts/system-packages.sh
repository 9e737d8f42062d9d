#!/usr/bin/env bash
# The Debian packages the tests run as real parts of a site (DESIGN.md, "Real parts"), installed with apt-get when
# missing: tinyproxy is the site's HTTP forward proxy (bench/site_network.py). Tests that need one fail, not skip, when
# it is absent, so this runs before them (scripts/test.sh). One "command package" pair a line; add parts here.
set -euo pipefail
parts='
tinyproxy tinyproxy
'
missing=()
while read -r command package; do
  [ -n "$command" ] || continue
  # /usr/sbin is not on every user's PATH
  if ! command -v "$command" >/dev/null && [ ! -x "/usr/sbin/$command" ]; then missing+=("$package"); fi
done <<< "$parts"
if [ ${#missing[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi
