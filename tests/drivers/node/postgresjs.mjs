// postgres.js (npm `postgres`, default `prepare: true`) in the driver matrix:
// the scenarios of ../README.md, each as postgres.js does it.
//
// postgres.js sends `sql.unsafe(text)` without parameters as a simple Query,
// `sql.unsafe(text, values)` as an unnamed Parse/Bind/Execute, and a tagged
// template (or `sql.unsafe(..., { prepare: true })`) as a named statement it
// parses once per connection (`Parse`/`Describe`, and with parameters a
// `Flush` before the `Bind`), then only binds. It pipelines the queries it is
// given at once on one connection.

import { pipeline } from 'node:stream/promises'
import { Readable, Writable } from 'node:stream'
import postgres from 'postgres'
import {
  COPY_ROWS,
  TIMEZONES,
  check,
  chunks,
  copyText,
  describe,
  env,
  eq,
  expectCode,
  range,
  runMatrix,
  waitFor,
  withTimeout,
} from './lib.mjs'

const T = 'pjs_' // table and schema prefix of this program

/**
 * A postgres.js instance through the proxy (or `port`), by default of one
 * connection, ended when the scenario ends. It connects at its first query.
 */
function connect(ctx, opts = {}, port = env.port) {
  const sql = postgres({
    host: env.host,
    port,
    user: env.user,
    pass: env.password,
    database: env.database,
    max: 1,
    connect_timeout: 20,
    onnotice: () => {},
    ...opts,
  })
  sql.close = ctx.own(
    () => sql.end({ timeout: 2 }),
    () => sql.end({ timeout: 0 }),
  )
  return sql
}

/** Straight to PostgreSQL: setup and pg_stat_activity checks. */
const direct = (ctx) => connect(ctx, { connection: { application_name: 'matrix-direct' } }, env.directPort)

/** The rows of a result as plain data. */
const rows = (result) => [...result]

/** Runs `fn(sql, i)` on `n` one-connection instances at once, each ended in turn. */
async function eachClient(ctx, n, optsFor, fn) {
  await Promise.all(
    range(n).map(async (i) => {
      const sql = connect(ctx, optsFor(i))
      try {
        await fn(sql, i)
      } finally {
        await sql.close()
      }
    }),
  )
}

const app = (name) => ({ connection: { application_name: name } })

const scenarios = {
  async simple_query(ctx) {
    ctx.step('50 simple queries per client')
    await eachClient(ctx, env.clients, (i) => app(`pjs-simple-${i}`), async (sql, i) => {
      for (let j = 0; j < 50; j++) {
        const r = await sql.unsafe(`select ${j} as n, 'c${i}' as who, ${i * 1000 + j} + 1 as total`)
        eq(rows(r), [{ n: j, who: `c${i}`, total: i * 1000 + j + 1 }], `client ${i} query ${j}`)
        eq(r.statement.name, '', `client ${i} query ${j} is unnamed`)
      }
      const multi = await sql.unsafe(`select ${i} as a; select 'two' as b`)
      eq(multi.map(rows), [[{ a: i }], [{ b: 'two' }]], `client ${i} two statements in one Query`)
    })
  },

  async prepared_default(ctx) {
    await preparedRuns(ctx, 'tagged', {}, (sql, s, args) => s.tagged(sql, ...args))
  },

  async prepared_forced(ctx) {
    await preparedRuns(ctx, 'forced', { prepare: true }, (sql, s, args) =>
      sql.unsafe(s.text, args, { prepare: true }),
    )
  },

  async same_name_different_text(ctx) {
    // postgres.js names a connection's statements <random id><counter>; with
    // Math.random fixed while the two connections start, both name their
    // statements alike: the same names for different text.
    ctx.step('connect with the same statement ids')
    const random = Math.random
    let a, b
    try {
      Math.random = () => 0.5
      a = connect(ctx, app('pjs-same-name-a'))
      b = connect(ctx, app('pjs-same-name-b'))
      await a`select 1`
      await b`select 1`
    } finally {
      Math.random = random
    }
    const qa = (j) => a`select ${j}::int * 10 as v`
    const qb = (j) => b`select 'b-' || ${j}::text as v`
    const na = () => a`select 'from-a' as who, 1 as one`
    const nb = () => b`select 2 as two, 'from-b' as who`
    const first = await Promise.all([qa(0), qb(0), na(), nb()])
    const names = first.map((r) => r.statement.name)
    check(
      names[0] && names[0] === names[1] && names[2] === names[3] && names[0] !== names[2],
      `the precondition failed: statement names ${JSON.stringify(names)} are not pairwise alike`,
    )
    for (let j = 0; j < 20; j++) {
      ctx.step(`interleaved round ${j}`)
      eq(rows(await qa(j)), [{ v: j * 10 }], `a round ${j}`)
      eq(rows(await qb(j)), [{ v: `b-${j}` }], `b round ${j}`)
      eq(rows(await nb()), [{ two: 2, who: 'from-b' }], `b no-parameter round ${j}`)
      eq(rows(await na()), [{ who: 'from-a', one: 1 }], `a no-parameter round ${j}`)
    }
    for (let j = 0; j < 10; j++) {
      ctx.step(`concurrent round ${j}`)
      const [ra, rb, rna, rnb] = await Promise.all([qa(j), qb(j), na(), nb()])
      eq(rows(ra), [{ v: j * 10 }], `a concurrent round ${j}`)
      eq(rows(rb), [{ v: `b-${j}` }], `b concurrent round ${j}`)
      eq(rows(rna), [{ who: 'from-a', one: 1 }], `a no-parameter concurrent round ${j}`)
      eq(rows(rnb), [{ two: 2, who: 'from-b' }], `b no-parameter concurrent round ${j}`)
    }
    await a.close()
    await b.close()
  },

  async transactions(ctx) {
    ctx.step('setup')
    const admin = direct(ctx)
    await admin.unsafe(`drop table if exists ${T}tx; create table ${T}tx (id int primary key, note text)`)
    await admin.close()
    const a = connect(ctx, app('pjs-tx-a'))
    const b = connect(ctx, app('pjs-tx-b'))
    const table = a(`${T}tx`)
    const ids = async () => rows(await b`select id from ${b(`${T}tx`)} order by id`).map((r) => r.id)

    ctx.step('commit')
    await a.begin(async (tx) => {
      await tx`insert into ${table} values (${1}, ${'committed'})`
      eq(await ids(), [], 'the other connection during the open transaction')
    })
    eq(await ids(), [1], 'the other connection after commit')

    ctx.step('rollback')
    const rollback = new Error('roll back, please')
    const err = await a
      .begin(async (tx) => {
        await tx`insert into ${table} values (${2}, ${'rolled back'})`
        eq(rows(await tx`select count(*)::int as n from ${table}`), [{ n: 2 }], 'inside the transaction')
        throw rollback
      })
      .then(
        () => null,
        (e) => e,
      )
    check(err === rollback, `sql.begin did not pass on the error that rolled it back: ${describe(err)}`)
    eq(await ids(), [1], 'the other connection after rollback')

    ctx.step('more work on the same connection')
    eq(rows(await a`select 1 as x`), [{ x: 1 }], 'select after rollback')
    await a`insert into ${table} values (${3}, ${'autocommit'})`
    await a.begin((tx) => [tx`update ${table} set note = ${'updated'} where id = ${1}`, tx`select 1`])
    eq(await ids(), [1, 3], 'the other connection at the end')
    eq(rows(await b`select note from ${b(`${T}tx`)} where id = 1`), [{ note: 'updated' }], 'the committed update')
    await a.close()
    await b.close()
  },

  async error_then_rollback(ctx) {
    // One connection (max: 1, which is what lets postgres.js pass a raw
    // `begin`): the raw statements as simple Queries, then the same as
    // tagged templates, that is named statements, bound again each round.
    ctx.step('connect')
    const sql = connect(ctx, app('pjs-error-rollback'))
    const variants = {
      unsafe: {
        begin: () => sql.unsafe('begin'),
        div: () => sql.unsafe('select 1/0'),
        one: () => sql.unsafe('select 1'),
        rollback: () => sql.unsafe('rollback'),
        x: () => sql.unsafe('select 1 as x'),
      },
      tagged: {
        begin: () => sql`begin`,
        div: () => sql`select 1/0`,
        one: () => sql`select 1`,
        rollback: () => sql`rollback`,
        x: () => sql`select 1 as x`,
      },
    }
    for (let round = 1; round <= 3; round++) {
      for (const [variant, q] of Object.entries(variants)) {
        const at = (s) => ctx.step(`round ${round} ${variant}: ${s}`)
        at('begin')
        await q.begin()
        at('select 1/0')
        await expectCode(q.div(), '22012', `round ${round} ${variant} select 1/0`)
        at('select 1')
        await expectCode(q.one(), '25P02', `round ${round} ${variant} select 1 after the error`)
        at('rollback')
        await q.rollback()
        at('select 1 as x')
        eq(rows(await q.x()), [{ x: 1 }], `round ${round} ${variant} select 1 as x`)
      }
    }
    await sql.close()
  },

  async savepoints(ctx) {
    ctx.step('setup')
    const admin = direct(ctx)
    await admin.unsafe(`drop table if exists ${T}sp; create table ${T}sp (id int primary key)`)
    const sql = connect(ctx, app('pjs-savepoints'))
    const table = sql(`${T}sp`)
    ctx.step('sql.begin with savepoints')
    await sql.begin(async (tx) => {
      await tx`insert into ${table} values (${1})`
      await expectCode(
        tx.savepoint(async (sp) => {
          await sp`insert into ${table} values (${2})`
          await sp`insert into ${table} values (${1})`
        }),
        '23505',
        'duplicate key inside a savepoint',
      )
      await tx`insert into ${table} values (${3})`
      await tx.savepoint('kept', (sp) => sp`insert into ${table} values (${4})`)
      await expectCode(
        tx.savepoint(async (sp) => {
          await sp`insert into ${table} values (${6})`
          await sp`select 1/0`
        }),
        '22012',
        'select 1/0 inside a savepoint',
      )
      await tx`insert into ${table} values (${5})`
      eq(
        rows(await tx`select array_agg(id order by id) as ids from ${table}`),
        [{ ids: [1, 3, 4, 5] }],
        'rows inside the transaction',
      )
    })
    ctx.step('raw savepoint statements')
    await sql.begin(async (tx) => {
      await tx.unsafe('savepoint raw')
      await tx.unsafe(`insert into ${T}sp values (7)`)
      await tx.unsafe('rollback to savepoint raw')
      await tx.unsafe(`insert into ${T}sp values (8)`)
      await tx.unsafe('release savepoint raw')
    })
    ctx.step('after commit')
    eq(
      rows(await admin`select array_agg(id order by id) as ids from ${admin(`${T}sp`)}`),
      [{ ids: [1, 3, 4, 5, 8] }],
      'rows seen directly after commit',
    )
    eq(rows(await sql`select 1 as x`), [{ x: 1 }], 'the connection after commit')
    await sql.close()
    await admin.close()
  },

  async startup_params(ctx) {
    ctx.step('setup')
    const admin = direct(ctx)
    for (const i of range(env.clients)) {
      await admin.unsafe(
        `drop schema if exists ${T}sch_${i} cascade; create schema ${T}sch_${i};` +
          `create table ${T}sch_${i}.whoami (n int); insert into ${T}sch_${i}.whoami values (${i})`,
      )
    }
    await admin.close()
    // postgres.js sends every key of `connection` as a startup parameter.
    const want = (i) => ({
      app: `pjs-startup-${i}`,
      tz: TIMEZONES[i % TIMEZONES.length],
      sp: `${T}sch_${i},public`,
      wm: `${1100 + 64 * i}kB`, // not a multiple of 1024: SHOW keeps kB
      n: i,
    })
    const opts = (i) => ({
      connection: {
        application_name: want(i).app,
        TimeZone: want(i).tz,
        search_path: want(i).sp,
        options: `-c work_mem=${want(i).wm}`,
      },
    })
    const probe =
      "select current_setting('application_name') as app, current_setting('TimeZone') as tz, " +
      "replace(current_setting('search_path'), ' ', '') as sp, current_setting('work_mem') as wm, " +
      '(select n from whoami) as n'
    await eachClient(ctx, env.clients, opts, async (sql, i) => {
      for (let t = 0; t < 20; t++) {
        ctx.step(`client ${i} transaction ${t}`)
        await sql.begin(async (tx) => {
          eq(rows(await tx.unsafe(probe)), [want(i)], `client ${i} transaction ${t} (simple)`)
          eq(rows(await tx.unsafe(`${probe} where $1::int = $1`, [t])), [want(i)], `client ${i} transaction ${t} (unnamed)`)
          eq(
            rows(
              await tx`select current_setting('application_name') as app, current_setting('TimeZone') as tz,
                replace(current_setting('search_path'), ' ', '') as sp, current_setting('work_mem') as wm,
                (select n from whoami) as n where ${t}::int = ${t}`,
            ),
            [want(i)],
            `client ${i} transaction ${t} (named)`,
          )
        })
        eq(rows(await sql.unsafe(probe)), [want(i)], `client ${i} after transaction ${t}`)
      }
    })
  },

  async copy(ctx) {
    ctx.step('setup')
    const admin = direct(ctx)
    for (const i of range(env.clients)) {
      await admin.unsafe(`drop table if exists ${T}copy_${i}; create table ${T}copy_${i} (id int, txt text)`)
    }
    await admin.close()
    await eachClient(ctx, env.clients, (i) => app(`pjs-copy-${i}`), async (sql, i) => {
      const text = copyText(i)
      const table = sql(`${T}copy_${i}`)
      ctx.step(`client ${i} copy from stdin`)
      const writable = await sql`copy ${table} (id, txt) from stdin`.writable()
      await pipeline(Readable.from(chunks(text)), writable)
      eq(
        rows(await sql`select count(*)::int as n, count(txt)::int as t from ${table}`),
        [{ n: COPY_ROWS, t: COPY_ROWS - COPY_ROWS / 100 }],
        `client ${i} rows after COPY FROM`,
      )
      ctx.step(`client ${i} copy to stdout`)
      const readable = await sql`copy (select id, txt from ${table} order by id) to stdout`.readable()
      const got = []
      await pipeline(
        readable,
        new Writable({
          write(chunk, _, done) {
            got.push(chunk)
            done()
          },
        }),
      )
      const out = Buffer.concat(got).toString('utf8')
      check(out === text, `client ${i} COPY TO: ${out.length} chars differ from the ${text.length} copied in`)
      eq(rows(await sql`select 1 as x`), [{ x: 1 }], `client ${i} after COPY`)
    })
  },

  async cancel(ctx) {
    ctx.step('connect')
    const victim = connect(ctx, app('pjs-cancel-victim'))
    const other = connect(ctx, app('pjs-cancel-other'))
    const mon = direct(ctx)
    await victim`select 1`
    await other`select 1`
    const running = async (text) =>
      (
        await mon`select count(*)::int as n from pg_stat_activity
          where state = 'active' and query = ${text} and pid <> pg_backend_pid()`
      )[0].n

    ctx.step('start pg_sleep(30)')
    const sleepText = 'select pg_sleep(30) as slept'
    const query = victim`select pg_sleep(30) as slept`
    const victimDone = query.then(
      (res) => ({ res }),
      (err) => ({ err }),
    )
    await waitFor(async () => (await running(sleepText)) === 1, 10_000, 'pg_sleep(30) running on the server')

    ctx.step('start the concurrent query')
    const otherText = "select pg_sleep(1) as s, 'other' as who"
    const otherDone = other`select pg_sleep(1) as s, 'other' as who`.then(
      (res) => ({ res }),
      (err) => ({ err }),
    )
    await waitFor(async () => (await running(otherText)) === 1, 10_000, 'the concurrent query running')

    ctx.step('cancel')
    // The query is on the wire, so query.cancel() sends a CancelRequest with
    // the connection's BackendKeyData over a new connection.
    const sent = Date.now()
    await withTimeout(query.cancel(), 10_000, 'the CancelRequest connection')
    const v = await withTimeout(victimDone, 10_000, 'the cancelled query')
    check(v.err, `pg_sleep(30) was not cancelled: it returned ${JSON.stringify(v.res && rows(v.res))}`)
    eq(v.err.code, '57014', `the cancelled query's SQLSTATE (${describe(v.err)})`)
    check(v.err.severity === 'ERROR', `57014 did not come from the server: ${describe(v.err)}`)
    check(Date.now() - sent < 10_000, 'the cancel took 10 s or more')

    ctx.step('the concurrent query')
    const o = await withTimeout(otherDone, 10_000, 'the concurrent query')
    check(!o.err, `the concurrent query failed: ${describe(o.err)}`)
    eq(rows(o.res), [{ s: '', who: 'other' }], 'the concurrent query')

    ctx.step('after the cancel')
    eq(rows(await victim`select 1 as x`), [{ x: 1 }], 'the cancelled connection afterwards')
    eq(rows(await victim`select ${41}::int + 1 as y`), [{ y: 42 }], 'the cancelled connection (parameter)')
    eq(await running(sleepText), 0, 'pg_sleep(30) still running on the server')
    await victim.close()
    await other.close()
    await mon.close()
  },

  async server_error(ctx) {
    ctx.step('setup')
    const admin = direct(ctx)
    await admin.unsafe(`drop table if exists ${T}err; create table ${T}err (id int primary key); insert into ${T}err values (1)`)
    await admin.close()
    const sql = connect(ctx, app('pjs-server-error'))
    const table = sql(`${T}err`)
    const missing = sql(`${T}no_such_table`)
    const cases = [
      ['23505', () => sql`insert into ${table} values (${1})`, `insert into ${T}err values (1)`, `insert into ${T}err values ($1)`],
      ['42P01', () => sql`select * from ${missing} where x = ${1}`, `select * from ${T}no_such_table`, `select * from ${T}no_such_table where x = $1`],
      ['42601', () => sql`selec ${1}`, 'selec 1', 'selec $1'],
      ['22012', () => sql`select ${1}::int / 0`, 'select 1/0', 'select $1::int / 0'],
    ]
    for (const [code, tagged, simple, extended] of cases) {
      const forms = {
        tagged,
        simple: () => sql.unsafe(simple),
        unnamed: () => sql.unsafe(extended, [1]),
      }
      for (const [form, run] of Object.entries(forms)) {
        ctx.step(`${code} ${form}`)
        await expectCode(run(), code, `${code} (${form})`)
        eq(rows(await sql`select 1 as x`), [{ x: 1 }], `the connection after ${code} (${form})`)
        eq(rows(await sql.unsafe('select 2 as y')), [{ y: 2 }], `the connection after ${code} (${form}, simple)`)
      }
    }
    await sql.close()
  },

  async alter_table_reprepare(ctx) {
    // The same sequence against PostgreSQL itself, then through the proxy.
    // postgres.js re-prepares a statement that fails in
    // RevalidateCachedQuery ("cached plan must not change result type").
    const sequence = async (port, where) => {
      ctx.step(`${where}: setup`)
      const admin = connect(ctx, app('matrix-direct'), env.directPort)
      await admin.unsafe(`drop table if exists ${T}art; create table ${T}art (id int); insert into ${T}art values (1)`)
      await admin.close()
      const a = connect(ctx, app('pjs-reprepare-a'), port)
      const b = connect(ctx, app('pjs-reprepare-b'), port)
      const table = a(`${T}art`)
      const run = async () => {
        try {
          const r = await a`select * from ${table}`
          return `columns=${r.columns.length} rows=${r.length}`
        } catch (err) {
          return `sqlstate=${err.code}`
        }
      }
      const out = []
      ctx.step(`${where}: first run`)
      out.push(await run())
      ctx.step(`${where}: alter table`)
      await b.unsafe(`alter table ${T}art add column extra text default 'x'`)
      ctx.step(`${where}: second run`)
      out.push(await run())
      ctx.step(`${where}: third run`)
      out.push(await run())
      out.push(`then ${rows(await a`select 1 as x`)[0].x}`)
      await a.close()
      await b.close()
      return out
    }
    const postgres = await sequence(env.directPort, 'direct')
    const proxied = await sequence(env.port, 'proxy')
    console.error(`postgres.js: alter_table_reprepare: direct ${JSON.stringify(postgres)}, proxy ${JSON.stringify(proxied)}`)
    eq(proxied, postgres, 'through the proxy vs directly')
  },
}

/**
 * `CLIENTS` one-connection instances, three parameterized statements 25
 * times each; each round's three go out at once (pipelined).
 */
async function preparedRuns(ctx, mode, opts, run) {
  const statements = [
    {
      name: 'sum',
      text: 'select $1::int + $2::int as s',
      tagged: (sql, a, b) => sql`select ${a}::int + ${b}::int as s`,
      args: (i, j) => [j, i],
      want: (i, j) => [{ s: i + j }],
    },
    {
      name: 'concat',
      text: "select $1::text || ':' || $2::text as t",
      tagged: (sql, a, b) => sql`select ${a}::text || ':' || ${b}::text as t`,
      args: (i, j) => [`c${i}`, String(j)],
      want: (i, j) => [{ t: `c${i}:${j}` }],
    },
    {
      name: 'series',
      text: 'select count(*)::int as n, sum(g)::int as total from generate_series(1, $1::int) g',
      tagged: (sql, a) => sql`select count(*)::int as n, sum(g)::int as total from generate_series(1, ${a}::int) g`,
      args: (i, j) => [j + i + 1],
      want: (i, j) => [{ n: j + i + 1, total: ((j + i + 1) * (j + i + 2)) / 2 }],
    },
  ]
  await eachClient(ctx, env.clients, (i) => ({ ...opts, ...app(`pjs-prepared-${mode}-${i}`) }), async (sql, i) => {
    for (let j = 0; j < 25; j++) {
      ctx.step(`client ${i} run ${j}`)
      const results = await Promise.all(statements.map((s) => run(sql, s, s.args(i, j))))
      statements.forEach((s, k) => {
        eq(rows(results[k]), s.want(i, j), `client ${i} ${mode} ${s.name} run ${j}`)
        check(results[k].statement.name, `client ${i} ${mode} ${s.name} run ${j} was not a named statement`)
      })
    }
  })
}

await runMatrix('postgres.js', scenarios)
