// The pgjdbc program of pgswitch's driver matrix (contract: ../README.md).
//
//   java -cp /usr/share/java/postgresql.jar DriverMatrix.java default|threshold1
//
// `default` keeps pgjdbc's default prepareThreshold (5: a PreparedStatement
// runs unnamed four times, then as a named server-side statement S_n);
// `threshold1` puts prepareThreshold=1 on every connection (named from the
// first execution, plain Statements included). Both modes run every scenario;
// `prepared_forced` uses prepareThreshold=1 in either mode.
//
// Prints `RESULT <scenario> PASS` or `RESULT <scenario> FAIL <reason>` per
// scenario, exits 0 only if all passed. Every scenario is bounded in time and
// the whole program keeps within a 110 s budget.

import java.io.StringReader;
import java.io.StringWriter;
import java.lang.reflect.Field;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.TimeZone;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;

import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class DriverMatrix {
    static final String HOST = env("PGHOST", "127.0.0.1");
    static final int PORT = Integer.parseInt(env("PGPORT", "5432"));
    static final int DIRECT_PORT = Integer.parseInt(env("DIRECT_PORT", env("PGPORT", "5432")));
    static final String USER = env("PGUSER", "app");
    static final String PASSWORD = env("PGPASSWORD", "secret");
    static final String DATABASE = env("PGDATABASE", "postgres");
    static final int CLIENTS = Integer.parseInt(env("CLIENTS", "4"));

    static final long SCENARIO_TIMEOUT_S = 30;
    static final long PROGRAM_BUDGET_S = 110;

    /** "default" or "threshold1". */
    static String mode;

    public static void main(String[] args) {
        mode = args.length > 0 ? args[0] : "default";
        if (!mode.equals("default") && !mode.equals("threshold1")) {
            System.err.println("usage: DriverMatrix default|threshold1");
            System.exit(2);
        }
        Map<String, Scenario> all = new LinkedHashMap<>();
        all.put("simple_query", DriverMatrix::simpleQuery);
        all.put("prepared_default", () -> prepared(Map.of(), false));
        all.put("prepared_forced", () -> prepared(Map.of("prepareThreshold", "1"), true));
        all.put("same_name_different_text", DriverMatrix::sameNameDifferentText);
        all.put("transactions", DriverMatrix::transactions);
        all.put("error_then_rollback", DriverMatrix::errorThenRollback);
        all.put("savepoints", DriverMatrix::savepoints);
        all.put("startup_params", DriverMatrix::startupParams);
        all.put("copy", DriverMatrix::copy);
        all.put("cancel", DriverMatrix::cancel);
        all.put("server_error", DriverMatrix::serverError);
        all.put("alter_table_reprepare", DriverMatrix::alterTableReprepare);

        List<String> selected = new ArrayList<>();
        for (String s : env("SCENARIOS", "").split(",")) {
            if (!s.isBlank()) selected.add(s.trim());
        }
        if (selected.isEmpty()) selected.addAll(all.keySet());

        long start = System.nanoTime();
        boolean allPassed = true;
        for (String name : selected) {
            Scenario scenario = all.get(name);
            long left = PROGRAM_BUDGET_S - (System.nanoTime() - start) / 1_000_000_000L;
            String failure;
            if (scenario == null) {
                failure = "unknown scenario";
            } else if (left < 5) {
                failure = "not run: the program's " + PROGRAM_BUDGET_S + " s budget is spent";
            } else {
                failure = runBounded(scenario, Math.min(SCENARIO_TIMEOUT_S, left));
            }
            if (failure == null) {
                System.out.println("RESULT " + name + " PASS");
            } else {
                allPassed = false;
                System.out.println("RESULT " + name + " FAIL " + oneLine(failure));
            }
            System.out.flush();
        }
        System.exit(allPassed ? 0 : 1);
    }

    /** Runs a scenario on its own thread; null when it passed, else why not. */
    static String runBounded(Scenario scenario, long timeoutS) {
        ExecutorService ex = Executors.newSingleThreadExecutor(DriverMatrix::daemon);
        Future<?> f = ex.submit(() -> {
            scenario.run();
            return null;
        });
        try {
            f.get(timeoutS, TimeUnit.SECONDS);
            return null;
        } catch (TimeoutException e) {
            f.cancel(true);
            return "timed out after " + timeoutS + " s";
        } catch (ExecutionException e) {
            return reason(e.getCause());
        } catch (InterruptedException e) {
            return "interrupted";
        } finally {
            ex.shutdownNow();
        }
    }

    // ------------------------------------------------------------------
    // Scenarios
    // ------------------------------------------------------------------

    /** CLIENTS connections at once, each 50 java.sql.Statement queries (no
     *  PreparedStatement), every text different, results checked; every
     *  tenth string holds two statements (pgjdbc sends both in one round trip). */
    static void simpleQuery() throws Exception {
        clients(CLIENTS, c -> {
            try (Connection conn = connect(); Statement st = conn.createStatement()) {
                for (int i = 0; i < 50; i++) {
                    int n = c * 1000 + i;
                    if (i % 10 == 9) {
                        check(st.execute("select " + n + "; select 'second " + n + "'"), "no result set");
                        try (ResultSet rs = st.getResultSet()) {
                            check(rs.next() && rs.getInt(1) == n, "query " + i + ": first result wrong");
                        }
                        check(st.getMoreResults(), "query " + i + ": second result missing");
                        try (ResultSet rs = st.getResultSet()) {
                            check(rs.next(), "query " + i + ": second result has no row");
                            checkEq("second " + n, rs.getString(1), "query " + i + " second result");
                        }
                        continue;
                    }
                    String sql = "select " + n + " as n, 'client " + c + "' as who, repeat('x', " + i + ") as pad";
                    try (ResultSet rs = st.executeQuery(sql)) {
                        check(rs.next(), "query " + i + ": no row");
                        checkEq(n, rs.getInt("n"), "query " + i + " n");
                        checkEq("client " + c, rs.getString("who"), "query " + i + " who");
                        checkEq(i, rs.getString("pad").length(), "query " + i + " pad length");
                        check(!rs.next(), "query " + i + ": more than one row");
                    }
                }
            }
        });
    }

    /** CLIENTS connections at once, each three PreparedStatements run 25
     *  times, interleaved. Afterwards pgjdbc must have named all three on the
     *  server (with `forced`, from the first execution). */
    static void prepared(Map<String, String> props, boolean forced) throws Exception {
        clients(CLIENTS, c -> {
            try (Connection conn = connect(PORT, props);
                    PreparedStatement add = conn.prepareStatement("select ?::int + 1");
                    PreparedStatement label = conn.prepareStatement("select ?::text || '-' || ?::int");
                    PreparedStatement sum = conn.prepareStatement("select sum(g) from generate_series(1, ?) g")) {
                for (int i = 0; i < 25; i++) {
                    add.setInt(1, i);
                    checkEq(String.valueOf(i + 1), one(add), "round " + i + " add");
                    label.setString(1, "c" + c);
                    label.setInt(2, i);
                    checkEq("c" + c + "-" + i, one(label), "round " + i + " label");
                    sum.setInt(1, i + 1);
                    checkEq(String.valueOf((long) (i + 1) * (i + 2) / 2), one(sum), "round " + i + " sum");
                    if (forced && i == 0) {
                        check(serverName(add) != null && serverName(label) != null && serverName(sum) != null,
                                "prepareThreshold=1 did not name the statements on their first execution");
                    }
                }
                for (PreparedStatement ps : List.of(add, label, sum)) {
                    check(serverName(ps) != null, "after 25 executions pgjdbc still runs " + ps + " unnamed");
                }
            }
        });
    }

    /** Two connections, each with two PreparedStatements prepared in the same
     *  order, so both get the names S_1 and S_2 for different text (different
     *  parameter counts and result types too); executions interleave. */
    static void sameNameDifferentText() throws Exception {
        try (Connection a = connect();
                Connection b = connect();
                PreparedStatement a1 = a.prepareStatement("select 'A:' || ?::text");
                PreparedStatement a2 = a.prepareStatement("select ?::int + 1000");
                PreparedStatement b1 = b.prepareStatement("select ?::int * ?::int");
                PreparedStatement b2 = b.prepareStatement("select 'B:' || ?::text || '!'")) {
            for (int r = 0; r < 20; r++) {
                a1.setString(1, "a" + r);
                checkEq("A:a" + r, one(a1), "round " + r + " connection A, first statement");
                b1.setInt(1, r);
                b1.setInt(2, 3);
                checkEq(String.valueOf(r * 3), one(b1), "round " + r + " connection B, first statement");
                a2.setInt(1, r);
                checkEq(String.valueOf(r + 1000), one(a2), "round " + r + " connection A, second statement");
                b2.setString(1, "b" + r);
                checkEq("B:b" + r + "!", one(b2), "round " + r + " connection B, second statement");
            }
            // The premise: pgjdbc really used the same names on both connections.
            String n1 = serverName(a1), n2 = serverName(a2);
            check(n1 != null && n1.equals(serverName(b1)) && n2 != null && n2.equals(serverName(b2)),
                    "premise broken: statement names A " + n1 + "/" + n2 + ", B " + serverName(b1) + "/" + serverName(b2));
        }
    }

    /** Commit (another connection sees the row), rollback (nobody does), then
     *  more work on the same connection, in and out of autocommit. */
    static void transactions() throws Exception {
        try (Connection a = connect(); Connection b = connect()) {
            exec(a, "drop table if exists jdbc_tx");
            exec(a, "create table jdbc_tx (id int primary key, note text)");
            a.setAutoCommit(false);
            try (PreparedStatement ins = a.prepareStatement("insert into jdbc_tx values (?, ?)")) {
                insert(ins, 1, "one");
                checkEq("", ids(b, "jdbc_tx"), "B before A's commit");
                a.commit();
                checkEq("1", ids(b, "jdbc_tx"), "B after A's commit");

                insert(ins, 2, "two");
                checkEq("1,2", ids(a, "jdbc_tx"), "A inside its second transaction");
                a.rollback();
                checkEq("1", ids(a, "jdbc_tx"), "A after rollback");
                checkEq("1", ids(b, "jdbc_tx"), "B after A's rollback");
                a.commit();

                insert(ins, 3, "three");
                exec(a, "update jdbc_tx set note = 'one, updated' where id = 1");
                a.commit();
                checkEq("1,3", ids(b, "jdbc_tx"), "B after A's third transaction");
                checkEq("one, updated", queryOne(b, "select note from jdbc_tx where id = 1"), "B sees the update");

                a.setAutoCommit(true);
                insert(ins, 4, "four");
                checkEq("1,3,4", ids(b, "jdbc_tx"), "B after A's autocommit insert");
            }
        }
    }

    /** Three rounds on one connection with autocommit off (pgjdbc sends BEGIN
     *  itself, and runs ROLLBACK/COMMIT as named statements): select 1/0 is
     *  22012, select 1 is 25P02, rollback() works, select 1 as x gives 1. */
    static void errorThenRollback() throws Exception {
        try (Connection c = connect();
                PreparedStatement div = c.prepareStatement("select 1/0");
                PreparedStatement one = c.prepareStatement("select 1");
                PreparedStatement x = c.prepareStatement("select 1 as x")) {
            c.setAutoCommit(false);
            for (int r = 1; r <= 3; r++) {
                String round = "round " + r + ": ";
                expectError("22012", round + "select 1/0", div::executeQuery);
                expectError("25P02", round + "select 1 in the failed transaction", one::executeQuery);
                try {
                    c.rollback();
                } catch (SQLException e) {
                    throw new Failure(round + "rollback: " + reason(e));
                }
                checkEq("1", one(x), round + "select 1 as x after rollback");
                c.commit();
            }
        }
    }

    /** Savepoint, a unique violation, rollback to the savepoint, more work, a
     *  released savepoint, commit: rows 1, 3, 4 survive, 2 does not. */
    static void savepoints() throws Exception {
        try (Connection a = connect(); Connection b = connect()) {
            exec(a, "drop table if exists jdbc_savepoint");
            exec(a, "create table jdbc_savepoint (id int primary key)");
            a.setAutoCommit(false);
            try (PreparedStatement ins = a.prepareStatement("insert into jdbc_savepoint values (?)")) {
                ins.setInt(1, 1);
                ins.executeUpdate();
                Savepoint sp = a.setSavepoint("before_two");
                ins.setInt(1, 2);
                ins.executeUpdate();
                ins.setInt(1, 1);
                expectError("23505", "duplicate insert after the savepoint", ins::executeUpdate);
                a.rollback(sp);
                ins.setInt(1, 3);
                ins.executeUpdate();
                Savepoint unnamed = a.setSavepoint();
                ins.setInt(1, 4);
                ins.executeUpdate();
                a.releaseSavepoint(unnamed);
                checkEq("1,3,4", ids(a, "jdbc_savepoint"), "A before commit");
                checkEq("", ids(b, "jdbc_savepoint"), "B before A's commit");
                a.commit();
                checkEq("1,3,4", ids(b, "jdbc_savepoint"), "B after commit");
                a.setAutoCommit(true);
                checkEq("1", queryOne(a, "select 1"), "A afterwards");
            }
        }
    }

    static final String[] ZONES = {
        "Asia/Tokyo", "America/Sao_Paulo", "Europe/Helsinki", "Pacific/Auckland",
        "Africa/Nairobi", "Asia/Kolkata", "America/Denver", "Australia/Adelaide",
    };
    static final Object TIMEZONE_LOCK = new Object();

    /** CLIENTS clients, each with its own ApplicationName, TimeZone (pgjdbc
     *  sends the JVM's default zone as the TimeZone startup parameter),
     *  search_path (even clients: currentSchema=, odd ones: options=-c
     *  search_path=) and options=-c work_mem=; all must hold on each of 24
     *  transactions (half autocommit, half explicit), as the server reports
     *  them and as pgjdbc's ParameterStatus view has them.
     *
     *  Each client's options also name a setting its startup parameters set
     *  too (odd: -c TimeZone=UTC, even: -c search_path=public). PostgreSQL
     *  applies `options` before the other startup parameters, so the
     *  parameter wins: the JVM's zone, currentSchema's path. */
    static void startupParams() throws Exception {
        try (Connection setup = connect()) {
            for (int c = 0; c < CLIENTS; c++) {
                exec(setup, "drop schema if exists jdbc_path_" + c + " cascade");
                exec(setup, "create schema jdbc_path_" + c);
                exec(setup, "create table jdbc_path_" + c + ".marker (v int)");
                exec(setup, "insert into jdbc_path_" + c + ".marker values (" + c + ")");
            }
        }
        clients(CLIENTS, c -> {
            String app = "jdbc_matrix_client_" + c;
            String zone = ZONES[c % ZONES.length];
            String schema = "jdbc_path_" + c;
            String workMem = (1000 + 10 * c) + "kB";
            Map<String, String> props = new HashMap<>();
            props.put("ApplicationName", app);
            String options = "-c work_mem=" + workMem;
            if (c % 2 == 0) {
                props.put("currentSchema", schema + ",public");
                options += " -c search_path=public";
            } else {
                options += " -c search_path=" + schema + ",public -c TimeZone=UTC";
            }
            props.put("options", options);
            List<String> expected = List.of(app, zone, "{" + schema + ",public}", workMem);
            String settings = "select current_setting('application_name'), current_setting('TimeZone'),"
                    + " current_schemas(false)::text, current_setting('work_mem')";
            try (Connection conn = connectInZone(zone, props);
                    PreparedStatement ps = conn.prepareStatement(settings);
                    Statement st = conn.createStatement()) {
                PGConnection pg = conn.unwrap(PGConnection.class);
                for (int t = 0; t < 24; t++) {
                    String tx = "transaction " + t + " (" + options + "): ";
                    boolean explicit = t % 2 == 1;
                    conn.setAutoCommit(!explicit);
                    checkEq(expected, row(ps), tx + "application_name, TimeZone, search path, work_mem");
                    checkEq(String.valueOf(c), queryOne(conn, "select v from marker"), tx + "marker found on search_path");
                    if (explicit) {
                        checkEq(zone, queryOne(conn, "show timezone"), tx + "show timezone");
                        conn.commit();
                    }
                    checkEq(app, pg.getParameterStatus("application_name"), tx + "ParameterStatus application_name");
                    checkEq(zone, pg.getParameterStatus("TimeZone"), tx + "ParameterStatus TimeZone");
                    Thread.sleep(2);
                }
            }
        });
    }

    /** CLIENTS connections at once: CopyManager.copyIn of 3000 rows (with
     *  escapes, NULLs and UTF-8) into its own table, then copyOut of them; the
     *  text out equals the text in. */
    static void copy() throws Exception {
        clients(CLIENTS, c -> {
            String table = "jdbc_copy_" + c;
            StringBuilder data = new StringBuilder();
            for (int id = 1; id <= 3000; id++) {
                String name = id % 10 == 0 ? "\\N" : "c" + c + " row " + id + " \u00fc\\\\x\\tz";
                data.append(id).append('\t').append(name).append('\n');
            }
            try (Connection conn = connect()) {
                exec(conn, "drop table if exists " + table);
                exec(conn, "create table " + table + " (id int primary key, name text)");
                CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
                long in = copy.copyIn("copy " + table + " (id, name) from stdin", new StringReader(data.toString()));
                checkEq(3000L, in, "rows copied in");
                checkEq("3000", queryOne(conn, "select count(*) from " + table), "count(*) after copy in");
                checkEq("c" + c + " row 1 \u00fc\\x\tz", queryOne(conn, "select name from " + table + " where id = 1"),
                        "row 1 as stored");
                StringWriter out = new StringWriter();
                long outRows = copy.copyOut("copy (select id, name from " + table + " order by id) to stdout", out);
                checkEq(3000L, outRows, "rows copied out");
                if (!out.toString().equals(data.toString())) {
                    String[] want = data.toString().split("\n", -1), got = out.toString().split("\n", -1);
                    int i = 0;
                    while (i < Math.min(want.length, got.length) && want[i].equals(got[i])) i++;
                    throw new Failure("copy out differs at line " + (i + 1) + ": want "
                            + (i < want.length ? want[i] : "<end>") + ", got " + (i < got.length ? got[i] : "<end>"));
                }
                checkEq("1", queryOne(conn, "select 1"), "connection after copy");
            }
        });
    }

    /** Statement.cancel() of pg_sleep(30) from another thread ends that query
     *  with 57014 while a second client's pg_sleep(3) on the pool completes;
     *  the cancelled connection works afterwards; then setQueryTimeout(1) does
     *  the same through pgjdbc's timer. */
    static void cancel() throws Exception {
        ExecutorService ex = Executors.newFixedThreadPool(2, DriverMatrix::daemon);
        try (Connection a = connect();
                Connection b = connect();
                Connection watch = connect(DIRECT_PORT, Map.of());
                Statement sa = a.createStatement();
                Statement sb = b.createStatement()) {
            try {
                Future<SQLException> victim = ex.submit(() -> {
                    try (ResultSet rs = sa.executeQuery("select pg_sleep(30) as jdbc_cancel_victim")) {
                        return null;
                    } catch (SQLException e) {
                        return e;
                    }
                });
                Future<String> bystander = ex.submit(() -> queryOne(b,
                        "select 'bystander' as jdbc_cancel_bystander from pg_sleep(3)"));
                awaitActive(watch, "jdbc_cancel_victim", "jdbc_cancel_bystander");
                long t0 = System.nanoTime();
                sa.cancel();
                SQLException e = await(victim, 10, "Statement.cancel() of pg_sleep(30)");
                check(e != null, "pg_sleep(30) completed despite Statement.cancel()");
                checkEq("57014", e.getSQLState(), "SQLSTATE of the cancelled query (" + e.getMessage() + ")");
                long ms = (System.nanoTime() - t0) / 1_000_000;
                check(ms < 10_000, "the cancelled query took " + ms + " ms to end");
                String other = await(bystander, 10, "the concurrent client's pg_sleep(3)");
                checkEq("bystander", other, "the concurrent client's query");
                checkEq("1", queryOne(a, "select 1"), "cancelled connection afterwards");
                checkEq("2", queryOne(a, "select 2 from pg_sleep(0.3)"), "cancelled connection, a second query");

                try (Statement st = a.createStatement()) {
                    st.setQueryTimeout(1);
                    Future<SQLException> timed = ex.submit(() -> {
                        try (ResultSet rs = st.executeQuery("select pg_sleep(30) as jdbc_timeout_victim")) {
                            return null;
                        } catch (SQLException x) {
                            return x;
                        }
                    });
                    SQLException te = await(timed, 10, "setQueryTimeout(1) on pg_sleep(30)");
                    check(te != null, "pg_sleep(30) completed despite setQueryTimeout(1)");
                    checkEq("57014", te.getSQLState(), "SQLSTATE after setQueryTimeout(1) (" + te.getMessage() + ")");
                }
                checkEq("3", queryOne(a, "select 3"), "connection after the query timeout");
                checkEq("4", queryOne(b, "select 4"), "the concurrent client afterwards");
            } finally {
                // On failure, do not leave sleeping queries holding the pool.
                exec(watch, "select pg_cancel_backend(pid) from pg_stat_activity where pid <> pg_backend_pid()"
                        + " and query like '%jdbc\\_%victim%'");
            }
        } finally {
            ex.shutdownNow();
        }
    }

    /** 23505, 42P01, 42601 and 22012 reach pgjdbc with their SQLSTATE, six
     *  rounds (so the statements pass the default prepareThreshold), and the
     *  connection answers after each. */
    static void serverError() throws Exception {
        try (Connection c = connect()) {
            exec(c, "drop table if exists jdbc_err");
            exec(c, "create table jdbc_err (id int primary key)");
            exec(c, "insert into jdbc_err values (1)");
            Map<String, PreparedStatement> errors = new LinkedHashMap<>();
            errors.put("23505", c.prepareStatement("insert into jdbc_err values (1)"));
            errors.put("42P01", c.prepareStatement("select * from jdbc_no_such_table"));
            errors.put("42601", c.prepareStatement("selec 1"));
            errors.put("22012", c.prepareStatement("select 1/0"));
            try (PreparedStatement ok = c.prepareStatement("select 1")) {
                for (int r = 1; r <= 6; r++) {
                    for (Map.Entry<String, PreparedStatement> e : errors.entrySet()) {
                        expectError(e.getKey(), "round " + r + ": " + e.getValue(), e.getValue()::execute);
                        checkEq("1", one(ok), "round " + r + ": select 1 after " + e.getKey());
                    }
                }
                try (Statement st = c.createStatement()) {
                    expectError("42P01", "Statement select from a missing table",
                            () -> st.executeQuery("select * from jdbc_no_such_table"));
                }
                checkEq("1", one(ok), "select 1 at the end");
            } finally {
                for (PreparedStatement ps : errors.values()) ps.close();
            }
        }
    }

    /** A PreparedStatement `select * from t` run five times (so the default
     *  threshold names it too), ALTER TABLE t ADD COLUMN from another
     *  connection, run twice more: the outcomes through the proxy equal those
     *  of the same sequence directly against PostgreSQL. */
    static void alterTableReprepare() throws Exception {
        List<String> direct = reprepareOutcomes(DIRECT_PORT, "jdbc_reprepare_direct");
        List<String> proxied = reprepareOutcomes(PORT, "jdbc_reprepare_proxy");
        System.err.println("alter_table_reprepare (" + mode + "): direct " + direct + ", through PGPORT " + proxied);
        checkEq(direct, proxied, "outcomes (direct vs. through PGPORT)");
    }

    static List<String> reprepareOutcomes(int port, String table) throws Exception {
        List<String> outcomes = new ArrayList<>();
        try (Connection c = connect(port, Map.of()); Connection other = connect(port, Map.of())) {
            exec(c, "drop table if exists " + table);
            exec(c, "create table " + table + " (a int)");
            exec(c, "insert into " + table + " values (1)");
            try (PreparedStatement ps = c.prepareStatement("select * from " + table)) {
                for (int i = 0; i < 5; i++) outcomes.add(outcome(ps));
                exec(other, "alter table " + table + " add column b text");
                outcomes.add(outcome(ps));
                outcomes.add(outcome(ps));
            }
            outcomes.add("then select 1: " + queryOne(c, "select 1"));
        }
        return outcomes;
    }

    /** "2 columns: 1,null" or "SQLSTATE 0A000". */
    static String outcome(PreparedStatement ps) {
        try (ResultSet rs = ps.executeQuery()) {
            ResultSetMetaData md = rs.getMetaData();
            List<String> rows = new ArrayList<>();
            while (rs.next()) {
                List<String> values = new ArrayList<>();
                for (int i = 1; i <= md.getColumnCount(); i++) values.add(String.valueOf(rs.getString(i)));
                rows.add(String.join(",", values));
            }
            return md.getColumnCount() + " columns: " + String.join(" / ", rows);
        } catch (SQLException e) {
            return "SQLSTATE " + e.getSQLState();
        }
    }

    // ------------------------------------------------------------------
    // Helpers
    // ------------------------------------------------------------------

    interface Scenario {
        void run() throws Exception;
    }

    interface ClientBody {
        void run(int client) throws Exception;
    }

    interface Sql {
        Object run() throws SQLException;
    }

    /** A check that did not hold; its message is the FAIL reason. */
    static class Failure extends Exception {
        Failure(String message) {
            super(message);
        }
    }

    static String env(String name, String fallback) {
        String v = System.getenv(name);
        return v == null || v.isEmpty() ? fallback : v;
    }

    static Thread daemon(Runnable r) {
        Thread t = new Thread(r);
        t.setDaemon(true);
        return t;
    }

    static Connection connect() throws SQLException {
        return connect(PORT, Map.of());
    }

    /** A connection with this mode's settings plus `extra` (pgjdbc properties). */
    static Connection connect(int port, Map<String, String> extra) throws SQLException {
        Properties p = new Properties();
        p.setProperty("user", USER);
        p.setProperty("password", PASSWORD);
        p.setProperty("connectTimeout", "10");
        p.setProperty("loginTimeout", "30");
        p.setProperty("socketTimeout", "40");
        if (mode.equals("threshold1")) p.setProperty("prepareThreshold", "1");
        p.putAll(extra);
        return DriverManager.getConnection("jdbc:postgresql://" + HOST + ":" + port + "/" + DATABASE, p);
    }

    /** pgjdbc sends the JVM's default time zone as the TimeZone startup
     *  parameter, so set it around this one connect. */
    static Connection connectInZone(String zone, Map<String, String> extra) throws SQLException {
        synchronized (TIMEZONE_LOCK) {
            TimeZone saved = TimeZone.getDefault();
            TimeZone.setDefault(TimeZone.getTimeZone(zone));
            try {
                return connect(PORT, extra);
            } finally {
                TimeZone.setDefault(saved);
            }
        }
    }

    /** Runs `body` for clients 0..n-1 on their own threads at once; the first
     *  failure (in client order) fails the scenario. */
    static void clients(int n, ClientBody body) throws Exception {
        ExecutorService ex = Executors.newFixedThreadPool(n, DriverMatrix::daemon);
        try {
            List<Future<?>> futures = new ArrayList<>();
            for (int i = 0; i < n; i++) {
                int client = i;
                futures.add(ex.submit(() -> {
                    body.run(client);
                    return null;
                }));
            }
            for (int i = 0; i < n; i++) {
                try {
                    futures.get(i).get();
                } catch (ExecutionException e) {
                    throw new Failure("client " + i + ": " + reason(e.getCause()));
                }
            }
        } finally {
            ex.shutdownNow();
        }
    }

    static <T> T await(Future<T> f, long seconds, String what) throws Exception {
        try {
            return f.get(seconds, TimeUnit.SECONDS);
        } catch (TimeoutException e) {
            throw new Failure(what + " did not end within " + seconds + " s");
        } catch (ExecutionException e) {
            throw new Failure(what + ": " + reason(e.getCause()));
        }
    }

    /** Waits (≤ 10 s) until PostgreSQL runs a query containing each tag. */
    static void awaitActive(Connection direct, String... tags) throws Exception {
        long deadline = System.nanoTime() + 10_000_000_000L;
        try (PreparedStatement ps = direct.prepareStatement("select count(*) from pg_stat_activity"
                + " where state = 'active' and pid <> pg_backend_pid() and position(? in query) > 0")) {
            for (String tag : tags) {
                while (true) {
                    ps.setString(1, tag);
                    if (!one(ps).equals("0")) break;
                    if (System.nanoTime() > deadline) throw new Failure("no active query " + tag + " in pg_stat_activity");
                    Thread.sleep(50);
                }
            }
        }
    }

    static void expectError(String sqlstate, String what, Sql action) throws Failure {
        try {
            action.run();
        } catch (SQLException e) {
            if (sqlstate.equals(e.getSQLState())) return;
            throw new Failure(what + ": expected SQLSTATE " + sqlstate + ", got " + reason(e));
        }
        throw new Failure(what + ": expected SQLSTATE " + sqlstate + ", but it succeeded");
    }

    static void exec(Connection c, String sql) throws SQLException {
        try (Statement st = c.createStatement()) {
            st.execute(sql);
        }
    }

    /** First column of the only row, as text. */
    static String queryOne(Connection c, String sql) throws Exception {
        try (Statement st = c.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            return single(rs, sql);
        }
    }

    static String one(PreparedStatement ps) throws Exception {
        try (ResultSet rs = ps.executeQuery()) {
            return single(rs, ps.toString());
        }
    }

    static String single(ResultSet rs, String what) throws Exception {
        check(rs.next(), what + ": no row");
        String v = rs.getString(1);
        check(!rs.next(), what + ": more than one row");
        return v;
    }

    /** All columns of the only row, as text. */
    static List<String> row(PreparedStatement ps) throws Exception {
        try (ResultSet rs = ps.executeQuery()) {
            check(rs.next(), ps + ": no row");
            List<String> values = new ArrayList<>();
            for (int i = 1; i <= rs.getMetaData().getColumnCount(); i++) values.add(rs.getString(i));
            check(!rs.next(), ps + ": more than one row");
            return values;
        }
    }

    /** The ids of `table`, "1,3,4" (empty when it has none). */
    static String ids(Connection c, String table) throws Exception {
        String v = queryOne(c, "select string_agg(id::text, ',' order by id) from " + table);
        return v == null ? "" : v;
    }

    static void insert(PreparedStatement ins, int id, String note) throws SQLException {
        ins.setInt(1, id);
        ins.setString(2, note);
        ins.executeUpdate();
    }

    /** The server-side statement name pgjdbc uses for `ps` (S_n), or null
     *  while it runs it unnamed. No public API tells, so this reads pgjdbc's
     *  internals (pinned: Debian's 42.5.5). */
    static String serverName(PreparedStatement ps) throws Exception {
        Object cachedQuery = field(ps, "preparedQuery");
        Object query = cachedQuery.getClass().getField("query").get(cachedQuery);
        return (String) field(query, "statementName");
    }

    static Object field(Object o, String name) throws Exception {
        for (Class<?> k = o.getClass(); k != null; k = k.getSuperclass()) {
            try {
                Field f = k.getDeclaredField(name);
                f.setAccessible(true);
                return f.get(o);
            } catch (NoSuchFieldException e) {
                // look in the superclass
            }
        }
        throw new Failure("pgjdbc internals changed: no field " + name + " in " + o.getClass().getName());
    }

    static void check(boolean ok, String message) throws Failure {
        if (!ok) throw new Failure(message);
    }

    static void checkEq(Object want, Object got, String what) throws Failure {
        if (!java.util.Objects.equals(want, got)) throw new Failure(what + ": want " + want + ", got " + got);
    }

    static String reason(Throwable t) {
        if (t instanceof Failure) return t.getMessage();
        if (t instanceof SQLException e) return "SQLSTATE " + e.getSQLState() + ": " + e.getMessage();
        return t.getClass().getSimpleName() + ": " + t.getMessage();
    }

    static String oneLine(String s) {
        return String.valueOf(s).replaceAll("\\s*[\r\n]+\\s*", " | ");
    }
}
