-- alter_table_reprepare: one execution of the prepared "select * from
-- libpq_alter" per transaction (-t 3, -M prepared: pgbench prepares it once
-- per connection). Before the second one the client waits at a gate, until
-- libpq.py (which meanwhile adds a column to the table) creates the file
-- :gate. Each execution prints the number of columns it got (debug() writes
-- to stderr); an error aborts the client and pgbench prints it.
\set n :n + 1
\if :n = 2
\shell for i in $(seq 300); do test -e :gate && exit 0; sleep 0.05; done; exit 1
\endif
\set col_b 0
select * from libpq_alter \gset col_
\if :col_b = 0
\set columns debug(1)
\else
\set columns debug(2)
\endif
