# Runs tests/memory_pressure_worker.py's measuring run, then the fixed and
# guarded runs with the spike sized from it, printing what each saw.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/b.log 2>&1 || tail -5 /tmp/b.log
M=$(python3 tests/memory_pressure_worker.py measure 0:0 2>/dev/null | grep '^{')
echo "$M" | cut -c1-400
E=$(python3 -c "import json,sys; m=json.loads(sys.argv[1]); print(f\"{m['idle']}:{m['free']-m['temporaries']+m['state_bytes']//2}\")" "$M")
echo spike=$E
for mode in ${MODES:-fixed guarded}; do
  PRESSURE_TRACE=1 python3 tests/memory_pressure_worker.py $mode $E 2>/dev/null | grep '^{' | cut -c1-3000
done
