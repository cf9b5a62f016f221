// node-postgres (`pg`, with `pg-copy-streams`) in the driver matrix: the
// scenarios of ../README.md, each as node-postgres does it.
//
// node-postgres sends a query without values and without `name` as a simple
// Query, one with values as an unnamed Parse/Bind/Execute, and one with
// `name:` as a named statement it parses once per connection and then only
// binds.

import { pipeline } from 'node:stream/promises'
import { Readable, Writable } from 'node:stream'
import pg from 'pg'
import copyStreams from 'pg-copy-streams'
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

const T = 'npg_' // table and schema prefix of this program (schemas may not start with pg_)

function config(port, extra = {}) {
  return {
    host: env.host,
    port,
    user: env.user,
    password: env.password,
    database: env.database,
    ...extra,
  }
}

/** A connected client through the proxy (or `port`), closed when the scenario ends. */
async function connect(ctx, extra = {}, port = env.port) {
  const client = new pg.Client(config(port, extra))
  client.on('error', (err) => {
    client.lastError = err
  })
  client.close = ctx.own(
    () => client.end(),
    () => client.connection.stream.destroy(),
  )
  await client.connect()
  return client
}

/** A client straight to PostgreSQL: setup and pg_stat_activity checks. */
const direct = (ctx, extra = {}) => connect(ctx, { application_name: 'matrix-direct', ...extra }, env.directPort)

/** Runs `fn(client)` on `n` clients at once, each connected and closed in turn. */
async function eachClient(ctx, n, extraFor, fn) {
  await Promise.all(
    range(n).map(async (i) => {
      const client = await connect(ctx, extraFor(i))
      try {
        await fn(client, i)
      } finally {
        await client.close()
      }
    }),
  )
}

const scenarios = {
  async simple_query(ctx) {
    ctx.step('50 simple queries per client')
    await eachClient(ctx, env.clients, (i) => ({ application_name: `pg-simple-${i}` }), async (c, i) => {
      for (let j = 0; j < 50; j++) {
        const r = await c.query(`select ${j} as n, 'c${i}' as who, ${i * 1000 + j} + 1 as total`)
        eq(r.rows, [{ n: j, who: `c${i}`, total: i * 1000 + j + 1 }], `client ${i} query ${j}`)
      }
      const multi = await c.query(`select ${i} as a; select 'two' as b`)
      eq(
        multi.map((r) => r.rows),
        [[{ a: i }], [{ b: 'two' }]],
        `client ${i} two statements in one Query`,
      )
    })
  },

  async prepared_default(ctx) {
    await preparedRuns(ctx, false)
  },

  async prepared_forced(ctx) {
    await preparedRuns(ctx, true)
  },

  async same_name_different_text(ctx) {
    ctx.step('connect')
    const a = await connect(ctx, { application_name: 'pg-same-name-a' })
    const b = await connect(ctx, { application_name: 'pg-same-name-b' })
    const qa = (j) => a.query({ name: 'shared_name', text: 'select $1::int * 10 as v', values: [j] })
    const qb = (j) => b.query({ name: 'shared_name', text: "select 'b-' || $1::text as v", values: [j] })
    const na = () => a.query({ name: 'shared_noparam', text: "select 'from-a' as who, 1 as one" })
    const nb = () => b.query({ name: 'shared_noparam', text: "select 2 as two, 'from-b' as who" })
    for (let j = 0; j < 20; j++) {
      ctx.step(`interleaved round ${j}`)
      eq((await qa(j)).rows, [{ v: j * 10 }], `a round ${j}`)
      eq((await qb(j)).rows, [{ v: `b-${j}` }], `b round ${j}`)
      eq((await nb()).rows, [{ two: 2, who: 'from-b' }], `b no-parameter round ${j}`)
      eq((await na()).rows, [{ who: 'from-a', one: 1 }], `a no-parameter round ${j}`)
    }
    for (let j = 0; j < 10; j++) {
      ctx.step(`concurrent round ${j}`)
      const [ra, rb, rna, rnb] = await Promise.all([qa(j), qb(j), na(), nb()])
      eq(ra.rows, [{ v: j * 10 }], `a concurrent round ${j}`)
      eq(rb.rows, [{ v: `b-${j}` }], `b concurrent round ${j}`)
      eq(rna.rows, [{ who: 'from-a', one: 1 }], `a no-parameter concurrent round ${j}`)
      eq(rnb.rows, [{ two: 2, who: 'from-b' }], `b no-parameter concurrent round ${j}`)
    }
    await a.close()
    await b.close()
  },

  async transactions(ctx) {
    ctx.step('setup')
    const admin = await direct(ctx)
    await admin.query(`drop table if exists ${T}tx; create table ${T}tx (id int primary key, note text)`)
    await admin.close()
    const a = await connect(ctx, { application_name: 'pg-tx-a' })
    const b = await connect(ctx, { application_name: 'pg-tx-b' })
    const ids = async () => (await b.query(`select id from ${T}tx order by id`)).rows.map((r) => r.id)

    ctx.step('commit')
    await a.query('begin')
    await a.query(`insert into ${T}tx values ($1, $2)`, [1, 'committed'])
    eq(await ids(), [], 'the other connection during the open transaction')
    await a.query('commit')
    eq(await ids(), [1], 'the other connection after commit')

    ctx.step('rollback')
    await a.query('begin')
    await a.query(`insert into ${T}tx values ($1, $2)`, [2, 'rolled back'])
    eq((await a.query(`select count(*)::int as n from ${T}tx`)).rows, [{ n: 2 }], 'inside the transaction')
    await a.query('rollback')
    eq(await ids(), [1], 'the other connection after rollback')

    ctx.step('more work on the same connection')
    eq((await a.query('select 1 as x')).rows, [{ x: 1 }], 'select after rollback')
    await a.query(`insert into ${T}tx values ($1, $2)`, [3, 'autocommit'])
    await a.query('begin')
    await a.query(`update ${T}tx set note = $1 where id = $2`, ['updated', 1])
    await a.query('commit')
    eq(await ids(), [1, 3], 'the other connection at the end')
    eq(
      (await b.query(`select note from ${T}tx where id = 1`)).rows,
      [{ note: 'updated' }],
      'the committed update',
    )
    await a.close()
    await b.close()
  },

  async error_then_rollback(ctx) {
    ctx.step('connect')
    const c = await connect(ctx, { application_name: 'pg-error-rollback' })
    // The plain text form (simple Query) and the named form (`name:`,
    // parsed once, then bound on every later round).
    const variants = {
      simple: (text) => c.query(text),
      named: (text, name) => c.query({ name, text }),
    }
    for (let round = 1; round <= 3; round++) {
      for (const [variant, q] of Object.entries(variants)) {
        const at = (s) => ctx.step(`round ${round} ${variant}: ${s}`)
        at('begin')
        await q('begin', 'etr_begin')
        at('select 1/0')
        await expectCode(q('select 1/0', 'etr_div'), '22012', `round ${round} ${variant} select 1/0`)
        at('select 1')
        await expectCode(q('select 1', 'etr_one'), '25P02', `round ${round} ${variant} select 1 after the error`)
        at('rollback')
        await q('rollback', 'etr_rollback')
        at('select 1 as x')
        eq((await q('select 1 as x', 'etr_x')).rows, [{ x: 1 }], `round ${round} ${variant} select 1 as x`)
      }
    }
    await c.close()
  },

  async savepoints(ctx) {
    ctx.step('setup')
    const admin = await direct(ctx)
    await admin.query(`drop table if exists ${T}sp; create table ${T}sp (id int primary key)`)
    const c = await connect(ctx, { application_name: 'pg-savepoints' })
    const ins = (id) => c.query(`insert into ${T}sp values ($1)`, [id])
    ctx.step('transaction with savepoints')
    await c.query('begin')
    await ins(1)
    await c.query('savepoint s1')
    await ins(2)
    await expectCode(ins(1), '23505', 'duplicate key inside savepoint s1')
    await expectCode(c.query('select 1'), '25P02', 'a query after the error')
    await c.query('rollback to savepoint s1')
    await ins(3)
    await c.query('savepoint s2')
    await ins(4)
    await c.query('release savepoint s2')
    await c.query({ name: 'sp_s3', text: 'savepoint s3' })
    await expectCode(c.query({ name: 'sp_div', text: 'select 1/0' }), '22012', 'select 1/0 inside savepoint s3')
    await c.query({ name: 'sp_rollback_s3', text: 'rollback to savepoint s3' })
    await ins(5)
    eq(
      (await c.query(`select array_agg(id order by id) as ids from ${T}sp`)).rows,
      [{ ids: [1, 3, 4, 5] }],
      'rows inside the transaction',
    )
    await c.query('commit')
    ctx.step('after commit')
    eq(
      (await admin.query(`select array_agg(id order by id) as ids from ${T}sp`)).rows,
      [{ ids: [1, 3, 4, 5] }],
      'rows seen directly after commit',
    )
    eq((await c.query('select 1 as x')).rows, [{ x: 1 }], 'the connection after commit')
    await c.close()
    await admin.close()
  },

  async startup_params(ctx) {
    ctx.step('setup')
    const admin = await direct(ctx)
    for (const i of range(env.clients)) {
      await admin.query(
        `drop schema if exists ${T}sch_${i} cascade; create schema ${T}sch_${i};` +
          `create table ${T}sch_${i}.whoami (n int); insert into ${T}sch_${i}.whoami values (${i})`,
      )
    }
    await admin.close()
    // node-postgres puts application_name and statement_timeout into the
    // startup packet itself; TimeZone and search_path only through options.
    const want = (i) => ({
      app: `pg-startup-${i}`,
      tz: TIMEZONES[i % TIMEZONES.length],
      sp: `${T}sch_${i},public`,
      wm: `${1100 + 64 * i}kB`, // not a multiple of 1024: SHOW keeps kB
      st: `${60001 + i}ms`, // not a multiple of 1000: SHOW keeps ms
      n: i,
    })
    const extra = (i) => ({
      application_name: want(i).app,
      statement_timeout: 60001 + i,
      options: `-c TimeZone=${want(i).tz} -c search_path=${want(i).sp} -c work_mem=${want(i).wm}`,
    })
    const probe =
      "select current_setting('application_name') as app, current_setting('TimeZone') as tz, " +
      "replace(current_setting('search_path'), ' ', '') as sp, current_setting('work_mem') as wm, " +
      "current_setting('statement_timeout') as st, (select n from whoami) as n"
    await eachClient(ctx, env.clients, extra, async (c, i) => {
      for (let t = 0; t < 20; t++) {
        ctx.step(`client ${i} transaction ${t}`)
        await c.query('begin')
        eq((await c.query(probe)).rows, [want(i)], `client ${i} transaction ${t}`)
        eq(
          (await c.query(`${probe} where $1::int = $1`, [t])).rows,
          [want(i)],
          `client ${i} transaction ${t} (extended)`,
        )
        await c.query('commit')
        eq((await c.query(probe)).rows, [want(i)], `client ${i} after transaction ${t}`)
      }
    })
  },

  async copy(ctx) {
    ctx.step('setup')
    const admin = await direct(ctx)
    for (const i of range(env.clients)) {
      await admin.query(`drop table if exists ${T}copy_${i}; create table ${T}copy_${i} (id int, txt text)`)
    }
    await admin.close()
    await eachClient(ctx, env.clients, (i) => ({ application_name: `pg-copy-${i}` }), async (c, i) => {
      const text = copyText(i)
      ctx.step(`client ${i} copy from stdin`)
      const from = c.query(copyStreams.from(`copy ${T}copy_${i} (id, txt) from stdin`))
      await pipeline(Readable.from(chunks(text)), from)
      eq(from.rowCount, COPY_ROWS, `client ${i} COPY FROM row count`)
      eq(
        (await c.query(`select count(*)::int as n, count(txt)::int as t from ${T}copy_${i}`)).rows,
        [{ n: COPY_ROWS, t: COPY_ROWS - COPY_ROWS / 100 }],
        `client ${i} rows after COPY FROM`,
      )
      ctx.step(`client ${i} copy to stdout`)
      const to = c.query(copyStreams.to(`copy (select id, txt from ${T}copy_${i} order by id) to stdout`))
      const got = []
      await pipeline(
        to,
        new Writable({
          write(chunk, _, done) {
            got.push(chunk)
            done()
          },
        }),
      )
      const out = Buffer.concat(got).toString('utf8')
      check(out === text, `client ${i} COPY TO: ${out.length} chars differ from the ${text.length} copied in`)
      eq(to.rowCount, COPY_ROWS, `client ${i} COPY TO row count`)
      eq((await c.query('select 1 as x')).rows, [{ x: 1 }], `client ${i} after COPY`)
    })
  },

  async cancel(ctx) {
    ctx.step('connect')
    const victim = await connect(ctx, { application_name: 'pg-cancel-victim' })
    const other = await connect(ctx, { application_name: 'pg-cancel-other' })
    const mon = await direct(ctx)
    const running = async (text) =>
      (
        await mon.query(
          "select count(*)::int as n from pg_stat_activity where state = 'active' and query = $1 and pid <> pg_backend_pid()",
          [text],
        )
      ).rows[0].n

    ctx.step('start pg_sleep(30)')
    const sleepText = 'select pg_sleep(30) as slept'
    const query = new pg.Query(sleepText)
    const victimDone = new Promise((resolve) => {
      query.on('error', (err) => resolve({ err }))
      query.on('end', (res) => resolve({ res }))
    })
    victim.query(query)
    await waitFor(async () => (await running(sleepText)) === 1, 10_000, 'pg_sleep(30) running on the server')

    ctx.step('start the concurrent query')
    const otherText = "select pg_sleep(1) as s, 'other' as who"
    const otherDone = other.query(otherText).then(
      (res) => ({ res }),
      (err) => ({ err }),
    )
    await waitFor(async () => (await running(otherText)) === 1, 10_000, 'the concurrent query running')

    ctx.step('cancel')
    // node-postgres's cancel: a fresh Client's connection sends the
    // CancelRequest with the victim's BackendKeyData.
    const canceller = new pg.Client(config(env.port))
    canceller.connection.on('error', () => {})
    ctx.own(
      () => canceller.connection.stream.destroy(),
      () => {},
    )
    const sent = Date.now()
    canceller.cancel(victim, query)
    const v = await withTimeout(victimDone, 10_000, 'the cancelled query')
    check(v.err, `pg_sleep(30) was not cancelled: it returned ${JSON.stringify(v.res && v.res.rows)}`)
    eq(v.err.code, '57014', `the cancelled query's SQLSTATE (${describe(v.err)})`)
    check(Date.now() - sent < 10_000, 'the cancel took 10 s or more')

    ctx.step('the concurrent query')
    const o = await withTimeout(otherDone, 10_000, 'the concurrent query')
    check(!o.err, `the concurrent query failed: ${describe(o.err)}`)
    eq(o.res.rows, [{ s: '', who: 'other' }], 'the concurrent query')

    ctx.step('after the cancel')
    eq((await victim.query('select 1 as x')).rows, [{ x: 1 }], 'the cancelled connection afterwards')
    eq((await victim.query('select $1::int + 1 as y', [41])).rows, [{ y: 42 }], 'the cancelled connection (extended)')
    eq(await running(sleepText), 0, 'pg_sleep(30) still running on the server')
    await victim.close()
    await other.close()
    await mon.close()
  },

  async server_error(ctx) {
    ctx.step('setup')
    const admin = await direct(ctx)
    await admin.query(`drop table if exists ${T}err; create table ${T}err (id int primary key); insert into ${T}err values (1)`)
    await admin.close()
    const c = await connect(ctx, { application_name: 'pg-server-error' })
    const cases = [
      ['23505', `insert into ${T}err values (1)`, `insert into ${T}err values ($1)`, [1]],
      ['42P01', `select * from ${T}no_such_table`, `select * from ${T}no_such_table where x = $1`, [1]],
      ['42601', 'selec 1', 'selec $1', [1]],
      ['22012', 'select 1/0', 'select $1::int / 0', [1]],
    ]
    for (const [code, simple, extended, values] of cases) {
      const forms = {
        simple: () => c.query(simple),
        extended: () => c.query(extended, values),
        named: () => c.query({ name: `err_${code}`, text: extended, values }),
      }
      for (const [form, run] of Object.entries(forms)) {
        ctx.step(`${code} ${form}`)
        await expectCode(run(), code, `${code} (${form})`)
        eq((await c.query('select 1 as x')).rows, [{ x: 1 }], `the connection after ${code} (${form})`)
        eq((await c.query('select $1::int as y', [2])).rows, [{ y: 2 }], `the connection after ${code} (${form}, extended)`)
      }
    }
    await c.close()
  },

  async alter_table_reprepare(ctx) {
    // The same sequence against PostgreSQL itself, then through the proxy.
    const sequence = async (port, where) => {
      ctx.step(`${where}: setup`)
      const admin = await connect(ctx, { application_name: 'matrix-direct' }, env.directPort)
      await admin.query(`drop table if exists ${T}art; create table ${T}art (id int); insert into ${T}art values (1)`)
      await admin.close()
      const a = await connect(ctx, { application_name: 'pg-reprepare-a' }, port)
      const b = await connect(ctx, { application_name: 'pg-reprepare-b' }, port)
      const run = async () => {
        try {
          const r = await a.query({ name: 'art_select', text: `select * from ${T}art` })
          return `columns=${r.fields.length} rows=${r.rows.length}`
        } catch (err) {
          return `sqlstate=${err.code}`
        }
      }
      const out = []
      ctx.step(`${where}: first run`)
      out.push(await run())
      ctx.step(`${where}: alter table`)
      await b.query(`alter table ${T}art add column extra text default 'x'`)
      ctx.step(`${where}: second run`)
      out.push(await run())
      ctx.step(`${where}: third run`)
      out.push(await run())
      out.push(`then ${(await a.query('select 1 as x')).rows[0].x}`)
      await a.close()
      await b.close()
      return out
    }
    const postgres = await sequence(env.directPort, 'direct')
    const proxied = await sequence(env.port, 'proxy')
    console.error(`node-postgres: alter_table_reprepare: direct ${JSON.stringify(postgres)}, proxy ${JSON.stringify(proxied)}`)
    eq(proxied, postgres, 'through the proxy vs directly')
  },
}

/** `CLIENTS` clients, three parameterized statements 25 times each. */
async function preparedRuns(ctx, named) {
  const statements = [
    {
      name: 'pm_sum',
      text: 'select $1::int + $2::int as s',
      values: (i, j) => [j, i],
      want: (i, j) => [{ s: i + j }],
    },
    {
      name: 'pm_concat',
      text: "select $1::text || ':' || $2::text as t",
      values: (i, j) => [`c${i}`, j],
      want: (i, j) => [{ t: `c${i}:${j}` }],
    },
    {
      name: 'pm_series',
      text: 'select count(*)::int as n, sum(g)::int as total from generate_series(1, $1::int) g',
      values: (i, j) => [j + i + 1],
      want: (i, j) => [{ n: j + i + 1, total: ((j + i + 1) * (j + i + 2)) / 2 }],
    },
  ]
  const mode = named ? 'named' : 'unnamed'
  await eachClient(ctx, env.clients, (i) => ({ application_name: `pg-prepared-${mode}-${i}` }), async (c, i) => {
    for (let j = 0; j < 25; j++) {
      for (const s of statements) {
        ctx.step(`client ${i} ${s.name} run ${j}`)
        const q = named
          ? { name: s.name, text: s.text, values: s.values(i, j) }
          : { text: s.text, values: s.values(i, j) }
        eq((await c.query(q)).rows, s.want(i, j), `client ${i} ${mode} ${s.name} run ${j}`)
      }
    }
  })
}

await runMatrix('node-postgres', scenarios)
