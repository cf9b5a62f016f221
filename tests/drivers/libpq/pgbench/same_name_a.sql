-- same_name_different_text, client A. pgbench -M prepared names the SQL
-- commands of a script P_0, P_1, ...; client B's script gets the same names
-- for different text (other tables, other columns, other parameter counts).
\set v random(1, 1000000)
insert into libpq_same_a (v) values (:v::int);
select :v::int * 2 as got \gset
\if :got != :v * 2
\set check_failed_wrong_result_a 1 / 0
\endif
