// Shared by pg.mjs and postgresjs.mjs: the environment of the driver-matrix
// contract (../README.md), the scenario runner that prints the RESULT lines,
// small assertion helpers and the data both programs use. Nothing here talks
// to a database.

import { isDeepStrictEqual } from 'node:util'

const STARTED = Date.now()

/** The environment the runner (tests/drivers.rs) sets. */
export const env = {
  host: process.env.PGHOST || '127.0.0.1',
  port: Number(process.env.PGPORT || 5432),
  directPort: Number(process.env.DIRECT_PORT || process.env.PGPORT || 5432),
  user: process.env.PGUSER || 'app',
  password: process.env.PGPASSWORD || 'secret',
  database: process.env.PGDATABASE || 'postgres',
  poolMode: process.env.POOL_MODE || 'transaction',
  poolSize: Number(process.env.POOL_SIZE || 2),
  clients: Number(process.env.CLIENTS || 4),
  scenarios: (process.env.SCENARIOS || '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean),
}

/** Every program runs these, in this order. */
export const SCENARIOS = [
  'simple_query',
  'prepared_default',
  'prepared_forced',
  'same_name_different_text',
  'transactions',
  'error_then_rollback',
  'savepoints',
  'startup_params',
  'copy',
  'cancel',
  'server_error',
  'alter_table_reprepare',
]

/** One scenario may take this long. */
const SCENARIO_TIMEOUT_MS = 30_000
/** The whole program ends well inside the runner's 120 s. */
const PROGRAM_BUDGET_MS = 110_000
/** A connection gets this long to close politely before it is destroyed. */
const CLOSE_TIMEOUT_MS = 3_000

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

export const range = (n) => [...Array(n).keys()]

export function oneLine(s) {
  return String(s).replace(/\s+/g, ' ').trim().slice(0, 400)
}

/** A short description of an error: SQLSTATE (if any) and message. */
export function describe(err) {
  if (err === undefined || err === null) return String(err)
  const code = err.code ? `${err.code} ` : ''
  return oneLine(`${code}${err.message || err}`)
}

export function check(condition, message) {
  if (!condition) throw new Error(message)
}

export function eq(actual, expected, what) {
  if (!isDeepStrictEqual(actual, expected)) {
    throw new Error(`${what}: got ${JSON.stringify(actual)}, want ${JSON.stringify(expected)}`)
  }
}

/** `promise` must reject with SQLSTATE `code`; returns the error. */
export async function expectCode(promise, code, what) {
  let result
  try {
    result = await promise
  } catch (err) {
    if (err && err.code === code) return err
    throw new Error(`${what}: want SQLSTATE ${code}, got ${describe(err)}`)
  }
  throw new Error(`${what}: want SQLSTATE ${code}, but it succeeded (${oneLine(JSON.stringify(result))})`)
}

export async function withTimeout(promise, ms, what) {
  let timer
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/** Polls `probe` until it returns something truthy. */
export async function waitFor(probe, ms, what) {
  const until = Date.now() + ms
  for (;;) {
    const value = await probe()
    if (value) return value
    if (Date.now() > until) throw new Error(`${what}: not within ${ms} ms`)
    await sleep(50)
  }
}

/** A different TimeZone per client of startup_params. */
export const TIMEZONES = ['UTC', 'America/New_York', 'Asia/Tokyo', 'Europe/Berlin', 'Australia/Sydney', 'America/Sao_Paulo']

export const COPY_ROWS = 3000

/** COPY text format: every 100th txt is NULL; tabs, backslashes, non-ASCII. */
export function copyText(client) {
  const lines = []
  for (let id = 1; id <= COPY_ROWS; id++) {
    const txt = id % 100 === 0 ? '\\N' : `c${client} r${id} tab\\there back\\\\slash ünï ${'x'.repeat(id % 17)}`
    lines.push(`${id}\t${txt}\n`)
  }
  return lines.join('')
}

/** The text in uneven pieces, so rows straddle CopyData messages. */
export function* chunks(text) {
  const buf = Buffer.from(text, 'utf8')
  for (let at = 0, n = 0; at < buf.length; n++) {
    const size = 1000 + ((n * 7919) % 6000)
    yield buf.subarray(at, at + size)
    at += size
  }
}

/** What one scenario gets: a label of where it is, and its connections. */
class Context {
  constructor(name) {
    this.name = name
    this.where = 'start'
    this.owned = []
  }

  /** Names the step the scenario is at; a timeout's FAIL reason shows it. */
  step(where) {
    this.where = where
  }

  /**
   * Registers a connection: `graceful()` closes it politely, `force()` tears
   * it down. Returns an idempotent close function; whatever the scenario does
   * not close itself is closed when it ends, pass or fail.
   */
  own(graceful, force) {
    let closing = null
    const close = () => {
      if (!closing) {
        closing = (async () => {
          try {
            await withTimeout(Promise.resolve().then(graceful), CLOSE_TIMEOUT_MS, 'close')
          } catch {
            try {
              await force()
            } catch {
              // already gone
            }
          }
        })()
      }
      return closing
    }
    this.owned.push(close)
    return close
  }

  async closeAll() {
    await Promise.all(this.owned.map((close) => close()))
  }
}

/**
 * Runs the selected scenarios one after the other, prints one RESULT line
 * each, exits 0 only if all passed. `scenarios` maps each name of SCENARIOS
 * to `async (ctx) => {}` that throws on failure.
 */
export async function runMatrix(driver, scenarios) {
  process.on('unhandledRejection', (err) => {
    console.error(`${driver}: unhandled rejection (ignored): ${describe(err)}`)
  })
  process.on('uncaughtException', (err) => {
    console.error(`${driver}: uncaught exception (ignored): ${describe(err)}`)
  })
  const selected = env.scenarios.length ? env.scenarios : SCENARIOS
  console.error(
    `${driver}: ${env.poolMode} mode, proxy ${env.host}:${env.port}, direct ${env.directPort}, ` +
      `pool ${env.poolSize}, ${env.clients} clients, scenarios ${selected.join(',')}`,
  )
  let failures = 0
  for (const name of selected) {
    const started = Date.now()
    let verdict
    const scenario = scenarios[name]
    const left = PROGRAM_BUDGET_MS - (started - STARTED)
    if (!scenario) {
      verdict = `FAIL unknown scenario ${name}`
    } else if (left < 5_000) {
      verdict = 'FAIL not run: the program time budget is used up'
    } else {
      const ctx = new Context(name)
      const limit = Math.min(SCENARIO_TIMEOUT_MS, left - 3_000)
      let timer
      const timeout = new Promise((resolve) => {
        timer = setTimeout(() => resolve(`FAIL timed out after ${limit} ms at: ${oneLine(ctx.where)}`), limit)
      })
      const run = (async () => {
        try {
          await scenario(ctx)
          return 'PASS'
        } catch (err) {
          return `FAIL ${oneLine(`[${ctx.where}] ${err && err.message ? err.message : err}`)}`
        }
      })()
      verdict = await Promise.race([run, timeout])
      clearTimeout(timer)
      await withTimeout(ctx.closeAll(), CLOSE_TIMEOUT_MS + 1_000, 'closing').catch(() => {})
    }
    if (verdict !== 'PASS') failures++
    console.log(`RESULT ${name} ${verdict}`)
    console.error(`${driver}: ${name} took ${Date.now() - started} ms`)
  }
  console.error(`${driver}: ${selected.length - failures} of ${selected.length} passed in ${Date.now() - STARTED} ms`)
  process.exit(failures ? 1 : 0)
}
