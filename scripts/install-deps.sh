#!/usr/bin/env bash
# Installs what `make test` needs on a fresh Debian machine, and nothing that is already there.
#   scripts/install-deps.sh [debian-package-or-command ...]
# Each argument is "command:package" (install package when command is missing).
set -euo pipefail

missing=()
for spec in "$@"; do
  cmd=${spec%%:*}
  pkg=${spec#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "$cmd" ]; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
