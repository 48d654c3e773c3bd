#!/usr/bin/env bash
# Runs shellcheck over every shell script of the deploy recipes, test drivers, tools and benches
# (found by name and by shebang, so a new script is checked without being listed here).
#   check_scripts.sh REPO_ROOT
set -euo pipefail
root=$1
if ! command -v shellcheck >/dev/null; then
  echo "FAIL shellcheck not found (Debian package shellcheck; ./deploy/install_deps.sh installs it)" >&2
  exit 1
fi
scripts=()
while IFS= read -r -d '' file; do
  case "$file" in
    *.sh | *.sbatch) scripts+=("$file") ;;
    *) head -n1 "$file" | grep -Eq '^#!.*\b(ba)?sh\b' && scripts+=("$file") ;;
  esac
done < <(find "$root/deploy" "$root/tests" "$root/tools" "$root/bench" -type f -not -path '*/fuzz/corpus/*' -print0)
if [ "${#scripts[@]}" -lt 3 ]; then
  echo "FAIL found only ${#scripts[@]} scripts under deploy/, tests/, tools/ and bench/" >&2
  exit 1
fi
shellcheck --external-sources "${scripts[@]}"
echo "PASS shellcheck: ${#scripts[@]} scripts"
