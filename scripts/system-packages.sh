#!/usr/bin/env bash
# The Debian packages the tests run as real parts of a site (DESIGN.md, "Real parts"), installed with apt-get when
# missing: tinyproxy is the site's HTTP forward proxy (bench/site_network.py); redis-server and postgresql are a
# facility's shared state, nginx the load balancer in front of its replicas (tests/state_servers.py); systemd-analyze
# checks the deployment example's unit (tests/test_deploy.py). Tests that need one fail, not skip, when it is absent,
# so this runs before them (scripts/test.sh). One "command package" pair a line; add parts here. Debian keeps
# PostgreSQL's programs in /usr/lib/postgresql/<version>/bin, off every PATH.
set -euo pipefail
parts='
tinyproxy tinyproxy
redis-server redis-server
nginx nginx
pg_ctlcluster postgresql
systemd-analyze systemd
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
