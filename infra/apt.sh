# Sourced by infra/test.sh and infra/demo.sh (bash): install Debian packages they need.
# apt_install PACKAGE WHAT [APT-GET OPTIONS...]: install a Debian package the tests or the demo need,
# as root or with passwordless sudo; otherwise say what to install and what fails without it (the run
# goes on).
apt_install() {
  local apt_get=() pkg="$1" what="$2"
  shift 2
  if [[ "$(id -u)" -eq 0 ]]; then
    apt_get=(env DEBIAN_FRONTEND=noninteractive apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt_get=(sudo -n env DEBIAN_FRONTEND=noninteractive apt-get)
  fi
  if ((${#apt_get[@]} == 0)); then
    echo "${0##*/}: $pkg is not installed and this user cannot run apt-get (not root, no passwordless sudo):" \
         "install the '$pkg' package; $what need it" >&2
    return 0
  fi
  echo "${0##*/}: installing $pkg ($what need it) via apt-get ..." >&2
  # Try the cached package lists first; refresh them only when that fails (fresh or stale image).
  if ! "${apt_get[@]}" install -y -qq "$@" "$pkg" >/dev/null 2>&1; then
    "${apt_get[@]}" update -qq >/dev/null && "${apt_get[@]}" install -y -qq "$@" "$pkg" >/dev/null \
      || echo "${0##*/}: apt-get could not install $pkg; $what will fail until it is installed" >&2
  fi
}

