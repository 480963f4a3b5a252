-- bench/percall.sql: server CPU time per call, measured inside one backend.
--
-- bench.percall(expr, tok, n) evaluates expr (which may use $1 = tok) n
-- times as the qual of a count over generate_series, and returns the CPU
-- time the backend spent, read from /proc/self/schedstat (nanoseconds of
-- run time: unaffected by time spent waiting for a core, so it holds up on
-- a busy machine far better than wall-clock TPS).  Needs superuser for
-- pg_read_file().

CREATE OR REPLACE FUNCTION bench.cpu_ns() RETURNS bigint
LANGUAGE sql VOLATILE
AS $$ SELECT split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::bigint $$;

CREATE OR REPLACE FUNCTION bench.percall(expr text, tok text, n integer,
										 OUT cpu_ns bigint, OUT hits bigint)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
	c0 bigint;
BEGIN
	c0 := bench.cpu_ns();
	EXECUTE format('SELECT count(*) FILTER (WHERE %s) FROM generate_series(1, %s)', expr, n)
		INTO hits USING tok;
	cpu_ns := bench.cpu_ns() - c0;
END
$$;
REVOKE ALL ON FUNCTION bench.cpu_ns(), bench.percall(text, text, integer) FROM PUBLIC;
