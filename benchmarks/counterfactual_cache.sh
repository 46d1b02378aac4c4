# Shared by the counterfactual benchmark scripts: carry a build across sessions. runs/ is not
# committed, so the small files of each finished retraining (the regenerated targets and the
# job description), the k = 0 control's images and the methods' scores are copied into a
# committed cache folder, and copied back into the output folder when a build starts.
# Callers set OUT (the counterfactual's output folder), CACHE (the committed folder) and NAME.

# The small files of an $OUT-like folder $1 (retrainings' images and job.json, the control's
# images, scores), NUL-separated, as paths relative to it.
cached_files() {
  (cd "$1" && find retrain original -mindepth 2 -maxdepth 2 -type f \
    \( -name 'images-*.npz' -o -name job.json \) -print0 2>/dev/null || true)
  (cd "$1" && find scores -mindepth 2 -maxdepth 2 -type f ! -name '.*' ! -name '*.tmp*' \
    -print0 2>/dev/null || true)
}

# Copy each of those files of $1 that $2 lacks or has older (atomically: temp name, rename).
copy_files() {
  local from=$1 to=$2 rel
  while IFS= read -r -d '' rel; do
    if [ ! -e "$to/$rel" ] || [ "$from/$rel" -nt "$to/$rel" ]; then
      mkdir -p "$(dirname "$to/$rel")"
      cp -p "$from/$rel" "$to/$rel.tmp.$BASHPID" && mv -f "$to/$rel.tmp.$BASHPID" "$to/$rel"
    fi
  done < <(cached_files "$from")
}

save_cache() {
  [ -d "$OUT" ] || return 0
  copy_files "$OUT" "$CACHE"
  echo "$NAME: $(find "$CACHE/retrain" -name 'images-*.npz' 2>/dev/null \
    | wc -l) retrainings saved in $CACHE (commit it to resume elsewhere)" >&2
}


# The start of a build: with --save-cache, save what $OUT finished and exit (e.g. from another
# shell before a session ends); otherwise restore what earlier sessions finished into $OUT.
start_from_cache() {
  if [ "${1:-}" = "--save-cache" ]; then
    save_cache
    exit 0
  fi
  mkdir -p "$OUT" "$CACHE"
  copy_files "$CACHE" "$OUT"
}
