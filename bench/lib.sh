# shellcheck shell=bash
# bench/lib.sh: shared helpers for bench/run and bench/rls_scan (sourced, not run).
#
# A throwaway cluster lives in a temporary directory that holds the data
# directory, the Unix socket (listen_addresses = '', so nothing listens on
# TCP and the port cannot clash with other clusters), the server log and the
# pgbench scripts.  Everything is removed on exit unless --keep was given.

PG_MAJOR=${PG_MAJOR:-15}
# the server to benchmark: PG_BIN, else the one PG_CONFIG names, else Debian's
if [ -z "${PG_BIN:-}" ] && [ -n "${PG_CONFIG:-}" ]; then
	PG_BIN=$("$PG_CONFIG" --bindir)
fi
PG_BIN=${PG_BIN:-/usr/lib/postgresql/$PG_MAJOR/bin}
export PATH="$PG_BIN:$PATH"

# Connection settings come only from us: clear what the caller's environment
# might carry (a stray PGOPTIONS would silently change every measurement).
unset PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGSSLMODE PGHOSTADDR PGAPPNAME

BENCH_TOKENS=()		# every token the run knows, for redaction

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Replace every known token in stdin by <token>.
redact() {
	local line t
	while IFS= read -r line || [ -n "$line" ]; do
		for t in "${BENCH_TOKENS[@]}"; do
			[ -n "$t" ] && line=${line//"$t"/<token>}
		done
		printf '%s\n' "$line"
	done
}

# Run a command as the postgres OS user when we are root (initdb refuses root).
as_pg() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# psql against the bench database as the bootstrap superuser; stops on error.
# Output is unaligned, tuples only.
q() { psql -X -q -v ON_ERROR_STOP=1 -At "$@"; }

# Median of the numbers in the arguments (each may hold several, space-separated),
# printed with one decimal.
median() {
	# shellcheck disable=SC2048,SC2086
	printf '%s\n' $* | sort -g | awk '{ v[NR] = $1 }
		END { if (NR == 0) { print "nan"; exit }
			  if (NR % 2) m = v[(NR + 1) / 2]; else m = (v[NR / 2] + v[NR / 2 + 1]) / 2;
			  printf "%.1f\n", m }'
}

# ratio a b: a / b with three decimals, or n/a.
ratio() {
	awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || a == "nan" || b == "nan" || b + 0 == 0) print "n/a"; else printf "%.3f\n", a / b }'
}

# Start a cluster: sets and exports BENCH_DIR, PGHOST, PGPORT, PGUSER, PGDATABASE.
#   cluster_start DBNAME [extra postgresql.conf lines...]
cluster_start() {
	local db=$1
	shift
	[ -f "$("$PG_BIN/pg_config" --pkglibdir)/apikey.so" ] ||
		die "apikey is not installed for PostgreSQL $PG_MAJOR: run 'make && make install' first"
	if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
		die "running as root needs a 'postgres' OS user to own the cluster"
	fi
	BENCH_DIR=$(mktemp -d "${TMPDIR:-/tmp}/apikey-bench.XXXXXX")
	chmod 755 "$BENCH_DIR"
	mkdir -p "$BENCH_DIR/scripts"
	[ "$(id -u)" -eq 0 ] && chown postgres: "$BENCH_DIR"
	trap cluster_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	log "initdb in $BENCH_DIR/data"
	as_pg "$PG_BIN/initdb" -D "$BENCH_DIR/data" -A trust -U postgres -E UTF8 --no-locale \
		>"$BENCH_DIR/initdb.log" 2>&1 || { cat "$BENCH_DIR/initdb.log" >&2; die "initdb failed"; }
	{
		echo "listen_addresses = ''"
		echo "unix_socket_directories = '$BENCH_DIR'"
		echo "port = 5432"
		echo "max_connections = 30"
		echo "shared_buffers = 256MB"
		echo "max_wal_size = 4GB"
		echo "checkpoint_timeout = 30min"
		echo "shared_preload_libraries = 'apikey'"
		# a usage writer in the bench database only (bench_issue, which
		# the run drops, has none to stop DROP DATABASE)
		echo "apikey.databases = '$db'"
		# room for every key the walk touches in two minutes' buckets, so
		# every call is counted and none takes the cheaper dropped path
		echo "apikey.usage_max_entries = 100000"
		echo "logging_collector = off"
		echo "log_min_messages = warning"
		for line in "$@"; do echo "$line"; done
	} >>"$BENCH_DIR/data/postgresql.conf"
	as_pg "$PG_BIN/pg_ctl" -D "$BENCH_DIR/data" -l "$BENCH_DIR/server.log" -w -t 60 start >/dev/null ||
		{ tail -n 30 "$BENCH_DIR/server.log" >&2; die "server did not start"; }
	BENCH_STARTED=1
	export PGHOST=$BENCH_DIR PGPORT=5432 PGUSER=postgres PGDATABASE=$db
	q -d postgres -c "CREATE DATABASE $db" || die "createdb failed"
	log "cluster up (socket $PGHOST, database $db)"
}

cluster_cleanup() {
	local rc=$?
	if [ -n "${BENCH_STARTED:-}" ]; then
		as_pg "$PG_BIN/pg_ctl" -D "$BENCH_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
		BENCH_STARTED=
	fi
	if [ -n "${BENCH_DIR:-}" ] && [ -d "$BENCH_DIR" ]; then
		if [ -n "${BENCH_KEEP:-}" ]; then
			log "kept $BENCH_DIR (cluster stopped; start with pg_ctl -D $BENCH_DIR/data start)"
		else
			rm -rf "$BENCH_DIR"
		fi
	fi
	exit $rc
}

# pgbench_tps NAME SCRIPT SECS CLIENTS [pgbench options...]
# Runs pgbench -M prepared -n and prints the TPS (excluding connection time).
# With BENCH_STEADY=1 it prints the mean TPS of the run's second half (from
# pgbench -P 1), for cases whose fresh connections start with a cold cache.
# Fails loudly on any pgbench error or failed transaction; output is redacted.
pgbench_tps() {
	local name=$1 script=$2 secs=$3 clients=$4
	shift 4
	local out="$BENCH_DIR/pgbench.out" tps failed
	[ -n "${BENCH_STEADY:-}" ] && set -- "$@" -P 1
	if ! pgbench -M prepared -n -c "$clients" -j "$clients" -T "$secs" -f "$script" "$@" \
		>"$out" 2>&1; then
		redact <"$out" | tail -n 20 >&2
		die "pgbench failed for case $name"
	fi
	failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
	if [ -n "$failed" ] && [ "$failed" != 0 ]; then
		redact <"$out" | tail -n 20 >&2
		die "case $name: $failed failed transactions"
	fi
	tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$out")
	if [ -n "${BENCH_STEADY:-}" ]; then
		# (a run too short for a progress line keeps its overall TPS)
		tps=$(awk -v secs="$secs" -v all="$tps" '/^progress: / { if ($2 + 0 > secs / 2) { s += $4; n++ } }
			END { if (n) printf "%.1f", s / n; else print all }' "$out")
	fi
	[ -n "$tps" ] || { redact <"$out" >&2; die "case $name: no tps in pgbench output"; }
	printf '%.1f\n' "$tps"
}

# Memory of a backend from /proc: "VmRSS RssAnon" in kB.
proc_mem() {
	awk '/^VmRSS:/ { r = $2 } /^RssAnon:/ { a = $2 } END { print r, a }' "/proc/$1/status"
}
