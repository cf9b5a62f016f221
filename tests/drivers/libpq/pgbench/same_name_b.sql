-- same_name_different_text, client B: same statement names as client A's
-- script (P_0, P_1), different text.
\set v random(1, 1000000)
\set w random(1, 1000)
select :v::int + :w::int as got, 'b' as tag \gset
\if :got != :v + :w
\set check_failed_wrong_result_b 1 / 0
\endif
insert into libpq_same_b (v, w, note) values (:v::int, :w::int, 'from b');
