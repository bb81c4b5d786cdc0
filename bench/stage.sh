# Sourced by bench/reproduction.sh and bench/peers.sh: `stage NAME COMMAND...`
# runs COMMAND once into $OUT/NAME (its output in log.txt) when $STAGES names
# it, skips it when $OUT/NAME/done exists (so a script resumes), and logs the
# wall time to $OUT/times.log.
stage() {
  local name=$1; shift
  [[ " $STAGES " == *" $name "* ]] || return 0
  [[ -e "$OUT/$name/done" ]] && { echo "== $name: done already"; return 0; }
  mkdir -p "$OUT/$name"
  echo "== $name: start $(date -u +%FT%TZ)" | tee -a "$OUT/times.log"
  local t0=$SECONDS
  "$@" > "$OUT/$name/log.txt" 2>&1
  local rc=$?
  [[ $rc == 0 ]] && touch "$OUT/$name/done"
  echo "== $name: $((SECONDS - t0)) s (rc $rc)" | tee -a "$OUT/times.log"
}
