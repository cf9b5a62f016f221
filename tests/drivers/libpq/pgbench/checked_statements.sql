-- prepared_default / prepared_forced: three parameterized statements per
-- transaction. pgbench sends :names as parameters ($1, $2, ...) in -M extended
-- and -M prepared, and inlines them in -M simple. Each result comes back with
-- \gset and is checked here; a wrong one aborts the client through a
-- deliberate client-side division by zero (pgbench has no "fail" command),
-- which libpq.py reports with the line of the check.
\set a random(1, 1000000)
\set b random(1, 1000)
\set k random(1, 100)
select :a::int + :b::int as got_sum \gset
\if :got_sum != :a + :b
\set check_failed_wrong_sum 1 / 0
\endif
select length(repeat('x', :b::int)) as got_len \gset
\if :got_len != :b
\set check_failed_wrong_length 1 / 0
\endif
select v as got_v from libpq_kv where k = :k::int \gset
\if :got_v != :k * 7
\set check_failed_wrong_row 1 / 0
\endif
