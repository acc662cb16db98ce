#!/usr/bin/env bash
# Download Llama-2 weights and tokenizer with the signed URL that Meta sends by e-mail,
# checking every file against the md5 checklists that come with it.
#
# Usage: bash download.sh [TARGET_FOLDER]      (default: the current directory)
# Interrupted downloads resume when the script is run again (wget --continue).
# Written to run on Linux and on macOS's bash 3.2 (no associative arrays, no mapfile).
set -euo pipefail

TARGET_FOLDER="${1:-.}"
ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"

die() { echo "Error: $*" >&2; exit 1; }

# Strip leading and trailing whitespace (pasted URLs often carry a trailing space or CR).
trim() {
    local s="$1"
    s="${s#"${s%%[![:space:]]*}"}"
    s="${s%"${s##*[![:space:]]}"}"
    printf '%s' "$s"
}

# Prints "<folder> <number of shards>" for a model name; fails for unknown names.
model_info() {
    case "$1" in
        7B) echo "llama-2-7b 1" ;;             7B-chat) echo "llama-2-7b-chat 1" ;;
        13B) echo "llama-2-13b 2" ;;           13B-chat) echo "llama-2-13b-chat 2" ;;
        70B) echo "llama-2-70b 8" ;;           70B-chat) echo "llama-2-70b-chat 8" ;;
        *) return 1 ;;
    esac
}

# "|| true": read fails at end of input without a newline, which still counts as an answer.
read -r -p "Enter the URL from email: " PRESIGNED_URL || true
read -r -p "Enter the list of models to download (${ALL_MODELS}), or press Enter for all: " MODEL_LIST || true
PRESIGNED_URL="$(trim "$PRESIGNED_URL")"
MODEL_LIST="$(trim "$MODEL_LIST")"

case "$PRESIGNED_URL" in
    *'*'*) ;;
    *) die "the URL must contain '*' where the file path goes (paste the URL from the e-mail unchanged)" ;;
esac
# Split the URL around its first '*' rather than using ${url/\*/path}: bash 5.2 gives '&'
# a meaning in that replacement text, and the signed query string is full of them.
URL_PREFIX="${PRESIGNED_URL%%\**}"
URL_SUFFIX="${PRESIGNED_URL#*\*}"

# Check every model name before downloading anything.
[ -n "$MODEL_LIST" ] || MODEL_LIST="$ALL_MODELS"
MODELS=""
IFS=',' read -r -a REQUESTED <<< "$MODEL_LIST"
for name in "${REQUESTED[@]}"; do
    name="$(trim "$name")"
    [ -n "$name" ] || continue
    model_info "$name" > /dev/null || die "unknown model '${name}'; choose from ${ALL_MODELS}"
    MODELS="${MODELS} ${name}"
done
[ -n "$MODELS" ] || die "no model selected; choose from ${ALL_MODELS}"
command -v wget > /dev/null 2>&1 || die "wget is not installed"

# fetch PATH: download <url with PATH for '*'> to TARGET_FOLDER/PATH, resuming a partial file.
fetch() {
    echo "Downloading $1"
    wget --continue "${URL_PREFIX}$1${URL_SUFFIX}" -O "${TARGET_FOLDER}/$1" \
        || die "failed to download $1 (wget exit code $?)"
}

# verify DIR CHECKLIST: check every "<md5>  <file>" line of DIR/CHECKLIST; stop on any failure.
verify() {
    local dir="$1" list="$2" out failed="" checked=0 hash file actual
    if command -v md5sum > /dev/null 2>&1; then
        if ! out="$(cd "$dir" && md5sum -c "$list" 2>&1)"; then
            failed="$(printf '%s\n' "$out" | { grep -v ': OK$' || echo "md5sum -c failed"; } | tr '\n' ' ')"
        fi
    elif command -v md5 > /dev/null 2>&1; then
        # macOS has no md5sum; `md5 -q FILE` prints just the hash, so compare line by line.
        while read -r hash file || [ -n "$hash" ]; do
            [ -n "$hash" ] || continue
            file="${file#\*}"   # md5sum marks binary-mode lines with '*' before the name
            checked=$((checked + 1))
            if [ ! -f "${dir}/${file}" ]; then
                failed="${failed}${file}: missing; "
            elif ! actual="$(md5 -q "${dir}/${file}")" || [ "$actual" != "$hash" ]; then
                failed="${failed}${file}: FAILED; "
            fi
        done < "${dir}/${list}"
        # An empty checklist must not pass as "verified".
        [ "$checked" -gt 0 ] || failed="no checksum lines found in ${list}"
    else
        die "neither md5sum nor md5 was found; install md5sum (GNU coreutils) to verify the download"
    fi
    [ -z "$failed" ] || die "checksum verification failed in ${dir}: ${failed}
Delete the files that failed and run the script again."
    echo "Checksums OK: ${dir}/${list}"
}

mkdir -p "$TARGET_FOLDER"
for f in LICENSE USE_POLICY.md tokenizer.model tokenizer_checklist.chk; do
    fetch "$f"
done
verify "$TARGET_FOLDER" tokenizer_checklist.chk

for name in $MODELS; do
    read -r folder shards <<< "$(model_info "$name")"
    echo "Downloading ${name} into ${TARGET_FOLDER}/${folder}"
    mkdir -p "${TARGET_FOLDER}/${folder}"
    for ((s = 0; s < shards; s++)); do
        fetch "${folder}/$(printf 'consolidated.%02d.pth' "$s")"
    done
    fetch "${folder}/params.json"
    fetch "${folder}/checklist.chk"
    verify "${TARGET_FOLDER}/${folder}" checklist.chk
done
echo "Done: ${MODELS# } downloaded and verified in ${TARGET_FOLDER}"
