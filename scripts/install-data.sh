#!/usr/bin/env bash
# Install Fashion-MNIST from Debian's dataset-fashion-mnist package (IDX files under
# /usr/share/datasets/fashion-mnist). Needs root or sudo; elsewhere pass --data-dir DIR.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "error: need root (or sudo) to apt-get install dataset-fashion-mnist; or use --data-dir DIR" >&2; exit 2; }
  SUDO=sudo
fi
command -v apt-get >/dev/null || { echo "error: no apt-get: put the four Fashion-MNIST IDX files in a folder and pass --data-dir DIR" >&2; exit 2; }
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist
