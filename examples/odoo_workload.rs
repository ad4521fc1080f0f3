//! A workload that writes to an Odoo 17 style database the way Odoo's ORM does,
//! so the connector is exercised by realistic transactions rather than toy inserts.
//!
//! What makes ORM traffic distinctive, and what this reproduces:
//! - `create()` of many records is one multi-row `INSERT ... RETURNING id` per
//!   model, at most 100 rows a statement (Odoo's insert batch size);
//! - stored computed fields are flushed afterwards as
//!   `UPDATE t SET ... FROM (VALUES ...) AS "__tmp"(id, ...) WHERE t.id = "__tmp".id`,
//!   so a freshly inserted row is updated again in the same transaction, often
//!   several times (write, then recompute, then a dependent recompute);
//! - one business action touches many tables in one transaction: confirming a
//!   paid web order writes sale_order, sale_order_line, res_partner,
//!   stock_picking, stock_move, stock_quant, account_move, account_move_line and
//!   the many2many `*_rel` tables;
//! - one2many owners are deleted with `ON DELETE CASCADE`, so one `DELETE` of an
//!   order yields delete events for its lines and their tax links;
//! - every action posts `bus_bus` notifications, and a cron garbage-collects them;
//!   a confirmation also logs a chatter message (`mail_message`).
//!
//! Values are interpolated client-side as literals, as psycopg2 does for Odoo.
//! The workload is one connection, like one Odoo worker: given `--seed` and a
//! freshly `--init`ed database it issues the same statements, so the counts it
//! prints are reproducible. The last stdout line is a JSON report with the rows
//! inserted/updated/deleted per table (cascaded deletes included), which is
//! exactly the number of change events a CDC consumer must see.
//!
//! ```text
//! cargo run --release --example odoo_workload -- \
//!     --source postgres://postgres@127.0.0.1:54329/odoo_demo --init --orders 600 --rate 20 --progress
//! ```
//!
//! The connection is plain TCP (`NoTls`): point it at a local or trusted database.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Transaction};

/// The schema and seed data loaded by `--init`.
pub const SCHEMA: &str = include_str!("../tests/fixtures/odoo_schema.sql");

/// Odoo's `INSERT_BATCH_SIZE`: `create()` splits bigger batches into statements of this many rows.
const BATCH: usize = 100;

#[derive(Parser, Debug)]
#[command(about = "Write an Odoo-like ORM workload (orders, deliveries, invoices) into PostgreSQL")]
struct Args {
    /// PostgreSQL URL of the database to write to
    #[arg(long)]
    source: String,
    /// Sales orders to create in total (0 with --init: only load the schema)
    #[arg(long, default_value_t = 1000)]
    orders: u64,
    /// Orders per second; 0 = as fast as possible
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Load the Odoo schema and seed data first (idempotent)
    #[arg(long)]
    init: bool,
    /// Print a progress line on stderr every second
    #[arg(long)]
    progress: bool,
    /// Seed of the pseudo-random choices (products, quantities, fates of orders)
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Every Nth request is a bulk import of up to 40 orders in one transaction
    #[arg(long, default_value_t = 50)]
    import_every: u64,
}

/// What to run; the CLI's flags minus the connection, so tests can drive it.
#[derive(Debug, Clone)]
pub struct Options {
    pub orders: u64,
    pub rate: f64,
    pub seed: u64,
    pub import_every: u64,
    pub progress: bool,
}

/// Rows changed in one table, by operation: the change events to expect.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableCounts {
    pub insert: u64,
    pub update: u64,
    pub delete: u64,
}

/// The outcome of a run. Only committed transactions are counted.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub seed: u64,
    pub orders: u64,
    pub transactions: u64,
    pub elapsed: Duration,
    pub tables: BTreeMap<String, TableCounts>,
}

impl Report {
    /// Rows changed over all tables.
    pub fn total(&self) -> TableCounts {
        self.tables
            .values()
            .fold(TableCounts::default(), |a, c| TableCounts {
                insert: a.insert + c.insert,
                update: a.update + c.update,
                delete: a.delete + c.delete,
            })
    }

    pub fn to_json(&self) -> serde_json::Value {
        let total = self.total();
        let secs = self.elapsed.as_secs_f64();
        let tables: serde_json::Map<String, serde_json::Value> = self
            .tables
            .iter()
            .map(|(t, c)| {
                (
                    t.clone(),
                    serde_json::json!({"insert": c.insert, "update": c.update, "delete": c.delete}),
                )
            })
            .collect();
        serde_json::json!({
            "seed": self.seed,
            "orders": self.orders,
            "transactions": self.transactions,
            "elapsed_secs": (secs * 1000.0).round() / 1000.0,
            "orders_per_sec": if secs > 0.0 { (self.orders as f64 / secs * 10.0).round() / 10.0 } else { 0.0 },
            "rows": {
                "insert": total.insert, "update": total.update, "delete": total.delete,
                "total": total.insert + total.update + total.delete,
            },
            "tables": tables,
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!(
            "--rate must be a number of orders per second, 0 or more (got {})",
            args.rate
        );
    }
    let mut client = connect(&args.source).await?;
    if args.init {
        load_schema(&client).await?;
        if args.progress {
            eprintln!("odoo_workload: schema and seed data loaded");
        }
    }
    if args.orders == 0 {
        return Ok(());
    }
    let opts = Options {
        orders: args.orders,
        rate: args.rate,
        seed: args.seed,
        import_every: args.import_every,
        progress: args.progress,
    };
    let report = run(&mut client, &opts).await?;
    println!("{}", report.to_json());
    Ok(())
}

/// Opens one plain-TCP connection, its driver running on the current runtime.
pub async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("odoo_workload: connection closed: {e}");
        }
    });
    Ok(client)
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// Loads [`SCHEMA`]: tables, constraints and seed rows, each only when missing.
pub async fn load_schema(client: &Client) -> Result<()> {
    client
        .batch_execute(SCHEMA)
        .await
        .context("loading tests/fixtures/odoo_schema.sql")
}

/// Runs the workload to completion and reports what it committed.
pub async fn run(client: &mut Client, opts: &Options) -> Result<Report> {
    let mut w = Workload::load(client, opts).await?;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut tick: u64 = 0;
    while w.created < opts.orders {
        tick += 1;
        let left = opts.orders - w.created;
        let n = if opts.import_every > 0 && tick.is_multiple_of(opts.import_every) {
            left.min(40)
        } else {
            1
        };
        w.create_quotations(client, n as usize, n > 1).await?;

        // Salespeople act on quotations a little after they were made, so
        // creation, confirmation and delivery of different orders interleave.
        while w.drafts.len() > 3 {
            w.decide_next(client).await?;
        }
        while w.to_deliver.len() > 5 {
            w.deliver_next(client).await?;
        }
        if w.rng.chance(5) {
            w.partner_signup(client).await?;
        }
        if w.rng.chance(3) {
            w.partner_edit(client).await?;
        }
        if tick.is_multiple_of(25) {
            w.cron_tick(client).await?;
        }

        if opts.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            w.print_progress(started.elapsed());
        }
        if opts.rate > 0.0 {
            let due = started + Duration::from_secs_f64(w.created as f64 / opts.rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    while !w.drafts.is_empty() {
        w.decide_next(client).await?;
    }
    while !w.to_deliver.is_empty() {
        w.deliver_next(client).await?;
    }
    if opts.progress {
        w.print_progress(started.elapsed());
    }
    Ok(Report {
        seed: opts.seed,
        orders: w.created,
        transactions: w.transactions,
        elapsed: started.elapsed(),
        tables: w.counts,
    })
}

/// SplitMix64: a fixed, documented sequence, so a seed means the same workload
/// whatever version of the `rand` crate is around.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant at these sizes.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Debug, Clone)]
struct Product {
    id: i32,
    tmpl_id: i32,
    code: String,
    name: String,
    price_cents: i64,
    quant_id: i32,
}

#[derive(Debug, Clone)]
struct Line {
    id: i32,
    product: usize,
    qty: i64,
    /// Percent.
    discount: i64,
    subtotal_cents: i64,
    tax_cents: i64,
    taxed: bool,
}

#[derive(Debug, Clone)]
struct Order {
    id: i32,
    partner_id: i32,
    user_id: i32,
    lines: Vec<Line>,
}

#[derive(Debug, Clone)]
struct Confirmed {
    order: Order,
    picking_id: i32,
    invoice_id: i32,
}

const USERS: [i32; 2] = [2, 6];
const COMPANY: i32 = 1;
const CURRENCY: i32 = 1;
const WAREHOUSE: i32 = 1;
const STOCK: i32 = 8;
const CUSTOMERS: i32 = 5;
const PICK_OUT: i32 = 2;
const JOURNAL: i32 = 1;
const ACC_RECEIVABLE: i32 = 1;
const ACC_INCOME: i32 = 2;
const ACC_TAX: i32 = 3;
const TAX_15: i32 = 1;
const TAX_0: i32 = 2;
/// Odoo stores naive UTC timestamps.
const NOW: &str = "(now() AT TIME ZONE 'UTC')";

struct Workload {
    rng: SplitMix64,
    products: Vec<Product>,
    customers: Vec<i32>,
    drafts: VecDeque<Order>,
    to_deliver: VecDeque<Confirmed>,
    created: u64,
    transactions: u64,
    next_cron: i32,
    counts: BTreeMap<String, TableCounts>,
    orders_target: u64,
}

#[derive(Clone, Copy)]
enum Op {
    Insert,
    Update,
    Delete,
}

/// A transaction whose row counts join the totals only if it commits.
struct Tx<'a> {
    tx: Transaction<'a>,
    pending: Vec<(&'static str, Op, u64)>,
}

impl<'a> Tx<'a> {
    async fn begin(client: &'a mut Client) -> Result<Tx<'a>> {
        Ok(Tx {
            tx: client.transaction().await.context("BEGIN")?,
            pending: Vec::new(),
        })
    }

    /// Runs one statement; returns the rows it affected and the first column of
    /// any rows it returned (RETURNING id), in order.
    async fn exec(&mut self, table: &'static str, op: Op, sql: &str) -> Result<(u64, Vec<String>)> {
        let msgs = self
            .tx
            .simple_query(sql)
            .await
            .with_context(|| format!("statement on {table} failed:\n{sql}"))?;
        let mut affected = 0;
        let mut returned = Vec::new();
        for m in msgs {
            match m {
                SimpleQueryMessage::CommandComplete(n) => affected = n,
                SimpleQueryMessage::Row(r) => {
                    returned.push(r.get(0).unwrap_or_default().to_string());
                }
                _ => {}
            }
        }
        self.pending.push((table, op, affected));
        Ok((affected, returned))
    }

    /// Counts rows a statement changes indirectly (cascades), measured beforehand.
    fn also(&mut self, table: &'static str, op: Op, n: u64) {
        self.pending.push((table, op, n));
    }

    async fn scalar(&self, sql: &str) -> Result<i64> {
        let msgs = self
            .tx
            .simple_query(sql)
            .await
            .with_context(|| format!("query failed:\n{sql}"))?;
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                let v = r.get(0).unwrap_or("0");
                return v
                    .parse()
                    .with_context(|| format!("not an integer: {v} from {sql}"));
            }
        }
        bail!("no row from {sql}")
    }

    /// Multi-row INSERT in statements of at most [`BATCH`] rows; returns the new ids in row order.
    async fn insert(
        &mut self,
        table: &'static str,
        columns: &str,
        rows: &[String],
    ) -> Result<Vec<i32>> {
        let mut ids = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(BATCH) {
            let sql = format!(
                "INSERT INTO {table} ({columns}) VALUES {} RETURNING id",
                chunk.join(", ")
            );
            let (n, returned) = self.exec(table, Op::Insert, &sql).await?;
            if n != chunk.len() as u64 || returned.len() != chunk.len() {
                bail!("{table}: inserted {n} rows, expected {}", chunk.len());
            }
            for id in returned {
                ids.push(id.parse().with_context(|| format!("{table} id {id}"))?);
            }
        }
        Ok(ids)
    }

    /// Inserts into a many2many table (no id column).
    async fn insert_rel(
        &mut self,
        table: &'static str,
        columns: &str,
        rows: &[String],
    ) -> Result<()> {
        for chunk in rows.chunks(BATCH) {
            let sql = format!(
                "INSERT INTO {table} ({columns}) VALUES {}",
                chunk.join(", ")
            );
            self.exec(table, Op::Insert, &sql).await?;
        }
        Ok(())
    }

    /// The ORM's flush of computed fields: `UPDATE .. FROM (VALUES ..)`, at most [`BATCH`] rows a statement.
    /// `set` refers to the values as `"__tmp".<col>`.
    async fn update_values(
        &mut self,
        table: &'static str,
        set: &str,
        tmp_cols: &str,
        rows: &[String],
    ) -> Result<()> {
        for chunk in rows.chunks(BATCH) {
            let sql = format!(
                "UPDATE {table} SET {set}, write_date = {NOW} FROM (VALUES {}) AS \"__tmp\"({tmp_cols}) \
                 WHERE {table}.id = \"__tmp\".id",
                chunk.join(", ")
            );
            self.exec(table, Op::Update, &sql).await?;
        }
        Ok(())
    }

    async fn commit(self, w: &mut Workload) -> Result<()> {
        self.tx.commit().await.context("COMMIT")?;
        w.transactions += 1;
        for (table, op, n) in self.pending {
            let c = w.counts.entry(table.to_string()).or_default();
            match op {
                Op::Insert => c.insert += n,
                Op::Update => c.update += n,
                Op::Delete => c.delete += n,
            }
        }
        Ok(())
    }
}

/// A SQL string literal (standard_conforming_strings is on in every supported PostgreSQL).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Cents as an exact numeric literal.
fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}{}.{:02}", c / 100, c % 100)
}

fn ids(list: &[i32]) -> String {
    list.iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Workload {
    async fn load(client: &Client, opts: &Options) -> Result<Workload> {
        let rows = client
            .query(
                "SELECT pp.id, pt.id, coalesce(pp.default_code, ''), pt.name->>'en_US',
                        (round(pt.list_price * 100))::int8, q.id
                   FROM product_product pp
                   JOIN product_template pt ON pt.id = pp.product_tmpl_id
                   JOIN stock_quant q ON q.product_id = pp.id AND q.location_id = $1
                  WHERE pt.sale_ok AND pp.active
                  ORDER BY pp.id",
                &[&STOCK],
            )
            .await
            .context("reading products (was the schema loaded? use --init)")?;
        let products: Vec<Product> = rows
            .iter()
            .map(|r| Product {
                id: r.get(0),
                tmpl_id: r.get(1),
                code: r.get(2),
                name: r.get(3),
                price_cents: r.get(4),
                quant_id: r.get(5),
            })
            .collect();
        let customers: Vec<i32> = client
            .query(
                "SELECT id FROM res_partner WHERE partner_share AND active ORDER BY id",
                &[],
            )
            .await
            .context("reading customers")?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if products.is_empty() || customers.is_empty() {
            bail!(
                "the database has no sellable products with stock or no customers: load tests/fixtures/odoo_schema.sql (--init)"
            );
        }
        Ok(Workload {
            rng: SplitMix64(opts.seed),
            products,
            customers,
            drafts: VecDeque::new(),
            to_deliver: VecDeque::new(),
            created: 0,
            transactions: 0,
            next_cron: 1,
            counts: BTreeMap::new(),
            orders_target: opts.orders,
        })
    }

    fn print_progress(&self, elapsed: Duration) {
        let t = self
            .counts
            .values()
            .map(|c| c.insert + c.update + c.delete)
            .sum::<u64>();
        let secs = elapsed.as_secs_f64().max(0.001);
        eprintln!(
            "odoo_workload: {}/{} orders, {} transactions, {t} rows changed, {:.1} orders/s, {:.0} rows/s",
            self.created,
            self.orders_target,
            self.transactions,
            self.created as f64 / secs,
            t as f64 / secs
        );
    }

    fn bus_row(partner: i32, kind: &str, model: &str, id: i32) -> String {
        let channel = format!("[\"odoo\",\"res.partner\",{partner}]");
        let message =
            format!("{{\"type\": \"{kind}\", \"payload\": {{\"{model}\": [{{\"id\": {id}}}]}}}}");
        format!("({}, {}, 1, {NOW}, 1, {NOW})", lit(&channel), lit(&message))
    }

    async fn notify(tx: &mut Tx<'_>, rows: &[String]) -> Result<()> {
        tx.insert(
            "bus_bus",
            "channel, message, create_uid, create_date, write_uid, write_date",
            rows,
        )
        .await?;
        Ok(())
    }

    /// `sale.order.create()` of `n` quotations with their lines (a web checkout,
    /// or an import when `n > 1`), then the flushes of the computed amounts.
    async fn create_quotations(
        &mut self,
        client: &mut Client,
        n: usize,
        import: bool,
    ) -> Result<()> {
        let mut orders: Vec<Order> = (0..n)
            .map(|_| {
                let partner_id = *self.rng.pick(&self.customers);
                let user_id = *self.rng.pick(&USERS);
                let lines = (0..self.rng.range(1, 8))
                    .map(|_| {
                        let product = self.rng.below(self.products.len() as u64) as usize;
                        let qty = self.rng.range(1, 10) as i64;
                        let discount = if self.rng.chance(20) { 10 } else { 0 };
                        let gross = self.products[product].price_cents * qty;
                        let subtotal_cents = (gross * (100 - discount) + 50) / 100;
                        let taxed = !self.rng.chance(15);
                        let tax_cents = if taxed {
                            (subtotal_cents * 15 + 50) / 100
                        } else {
                            0
                        };
                        Line {
                            id: 0,
                            product,
                            qty,
                            discount,
                            subtotal_cents,
                            tax_cents,
                            taxed,
                        }
                    })
                    .collect();
                Order {
                    id: 0,
                    partner_id,
                    user_id,
                    lines,
                }
            })
            .collect();

        let mut tx = Tx::begin(client).await?;
        let origin = if import { "'import'" } else { "NULL" };
        let so_rows: Vec<String> = orders
            .iter()
            .map(|o| {
                format!(
                    "('S' || lpad(nextval('ir_sequence_001')::text, 5, '0'), 'draft', {COMPANY}, {p}, {p}, {p}, {CURRENCY}, {u}, {WAREHOUSE}, \
                     {origin}, md5(random()::text), 'no', 'direct', {NOW}, (now() + interval '30 days')::date, \
                     0, 0, 0, 1.0, false, true, false, 1.0, {u}, {NOW}, {u}, {NOW})",
                    p = o.partner_id,
                    u = o.user_id
                )
            })
            .collect();
        let so_ids = tx
            .insert(
                "sale_order",
                "name, state, company_id, partner_id, partner_invoice_id, partner_shipping_id, currency_id, user_id, \
                 warehouse_id, origin, access_token, invoice_status, picking_policy, date_order, validity_date, \
                 amount_untaxed, amount_tax, amount_total, currency_rate, locked, require_signature, require_payment, \
                 prepayment_percent, create_uid, create_date, write_uid, write_date",
                &so_rows,
            )
            .await?;
        for (o, id) in orders.iter_mut().zip(&so_ids) {
            o.id = *id;
        }

        // All lines of all orders in one create(), as the ORM batches one2many commands.
        let mut line_rows = Vec::new();
        for o in &orders {
            for (seq, l) in o.lines.iter().enumerate() {
                let p = &self.products[l.product];
                let analytic = match self.rng.below(3) {
                    0 => "NULL".to_string(),
                    1 => "'{\"3\": 100}'".to_string(),
                    _ => "'{\"3\": 60, \"4\": 40}'".to_string(),
                };
                line_rows.push(format!(
                    "({}, {}, {COMPANY}, {CURRENCY}, {}, {}, {}, {}, 1, 'draft', 'stock_move', 'no', {analytic}, {}, \
                     {}.0, {}, {}, 0, 0, false, false, {}, {NOW}, {}, {NOW})",
                    o.id,
                    (seq as i32 + 1) * 10,
                    o.partner_id,
                    o.user_id,
                    p.id,
                    p.tmpl_id,
                    lit(&format!("[{}] {}", p.code, p.name)),
                    l.qty,
                    money(p.price_cents),
                    l.discount,
                    o.user_id,
                    o.user_id,
                ));
            }
        }
        let line_ids = tx
            .insert(
                "sale_order_line",
                "order_id, sequence, company_id, currency_id, order_partner_id, salesman_id, product_id, \
                 product_template_id, product_uom, state, qty_delivered_method, invoice_status, analytic_distribution, \
                 name, product_uom_qty, price_unit, discount, customer_lead, qty_delivered, is_downpayment, is_expense, \
                 create_uid, create_date, write_uid, write_date",
                &line_rows,
            )
            .await?;
        let mut it = line_ids.into_iter();
        for o in &mut orders {
            for l in &mut o.lines {
                l.id = it.next().context("fewer sale_order_line ids than rows")?;
            }
        }

        let lines: Vec<&Line> = orders.iter().flat_map(|o| &o.lines).collect();
        let rel: Vec<String> = lines
            .iter()
            .map(|l| format!("({}, {})", l.id, if l.taxed { TAX_15 } else { TAX_0 }))
            .collect();
        tx.insert_rel(
            "account_tax_sale_order_line_rel",
            "sale_order_line_id, account_tax_id",
            &rel,
        )
        .await?;

        // Flush 1: the lines' computed amounts.
        let line_amounts: Vec<String> = lines
            .iter()
            .map(|l| {
                let unit_net = l.subtotal_cents / l.qty;
                let unit_tax = if l.taxed {
                    (unit_net * 15 + 50) / 100
                } else {
                    0
                };
                format!(
                    "({}, {}::numeric, {}::float8, {}::numeric, {}::numeric, {}::numeric)",
                    l.id,
                    money(l.subtotal_cents),
                    money(l.tax_cents),
                    money(l.subtotal_cents + l.tax_cents),
                    money(unit_net),
                    money(unit_net + unit_tax),
                )
            })
            .collect();
        tx.update_values(
            "sale_order_line",
            "price_subtotal = \"__tmp\".price_subtotal, price_tax = \"__tmp\".price_tax, \
             price_total = \"__tmp\".price_total, price_reduce_taxexcl = \"__tmp\".price_reduce_taxexcl, \
             price_reduce_taxinc = \"__tmp\".price_reduce_taxinc, qty_to_invoice = 0, \
             untaxed_amount_to_invoice = 0, untaxed_amount_invoiced = 0, qty_invoiced = 0",
            "id, price_subtotal, price_tax, price_total, price_reduce_taxexcl, price_reduce_taxinc",
            &line_amounts,
        )
        .await?;

        // Flush 2: the orders' totals, which depend on the lines just written.
        let order_amounts: Vec<String> = orders
            .iter()
            .map(|o| {
                let untaxed: i64 = o.lines.iter().map(|l| l.subtotal_cents).sum();
                let tax: i64 = o.lines.iter().map(|l| l.tax_cents).sum();
                format!(
                    "({}, {}::numeric, {}::numeric, {}::numeric)",
                    o.id,
                    money(untaxed),
                    money(tax),
                    money(untaxed + tax)
                )
            })
            .collect();
        tx.update_values(
            "sale_order",
            "amount_untaxed = \"__tmp\".amount_untaxed, amount_tax = \"__tmp\".amount_tax, \
             amount_total = \"__tmp\".amount_total",
            "id, amount_untaxed, amount_tax, amount_total",
            &order_amounts,
        )
        .await?;

        // Flush 3: a stored field computed from the partner (terms in the customer's language).
        let so_ids: Vec<i32> = orders.iter().map(|o| o.id).collect();
        tx.exec(
            "sale_order",
            Op::Update,
            &format!(
                "UPDATE sale_order SET note = CASE WHEN p.lang = 'fr_FR' \
                   THEN '<p>Conditions générales : paiement à 30 jours.</p>' \
                   ELSE '<p>Terms &amp; Conditions: payment within 30 days.</p>' END, \
                   write_date = {NOW} \
                 FROM res_partner p WHERE p.id = sale_order.partner_id AND sale_order.id IN ({})",
                ids(&so_ids)
            ),
        )
        .await?;

        let bus: Vec<String> = orders
            .iter()
            .map(|o| Self::bus_row(o.partner_id, "mail.record/insert", "sale.order", o.id))
            .collect();
        Self::notify(&mut tx, &bus).await?;
        tx.commit(self).await?;
        self.created += n as u64;
        self.drafts.extend(orders);
        Ok(())
    }

    /// What happens to the oldest quotation: mostly paid and confirmed, sometimes
    /// sent, cancelled, or deleted.
    async fn decide_next(&mut self, client: &mut Client) -> Result<()> {
        let Some(order) = self.drafts.pop_front() else {
            return Ok(());
        };
        match self.rng.below(100) {
            0..70 => self.confirm(client, order).await,
            70..78 => self.cancel(client, order).await,
            78..85 => self.unlink(client, order).await,
            _ => self.mark_sent(client, order).await,
        }
    }

    /// A paid web order: `action_confirm()` with automatic invoicing, one transaction
    /// across sales, stock and accounting.
    async fn confirm(&mut self, client: &mut Client, order: Order) -> Result<()> {
        let o = &order;
        let u = o.user_id;
        let mut tx = Tx::begin(client).await?;
        tx.exec(
            "sale_order",
            Op::Update,
            &format!(
                "UPDATE sale_order SET state = 'sale', date_order = {NOW}, write_uid = {u}, write_date = {NOW} WHERE id = {}",
                o.id
            ),
        )
        .await?;
        tx.exec(
            "sale_order_line",
            Op::Update,
            &format!(
                "UPDATE sale_order_line SET state = 'sale', write_uid = {u}, write_date = {NOW} WHERE order_id = {}",
                o.id
            ),
        )
        .await?;
        tx.exec(
            "res_partner",
            Op::Update,
            &format!(
                "UPDATE res_partner SET customer_rank = customer_rank + 1, write_date = {NOW} WHERE id = {}",
                o.partner_id
            ),
        )
        .await?;
        // mail.thread: the confirmation is logged in the order's chatter.
        tx.insert(
            "mail_message",
            "model, res_id, body, message_type, date, create_uid, create_date, write_uid, write_date",
            &[format!(
                "('sale.order', {}, '<p>Quotation confirmed</p>', 'notification', {NOW}, {u}, {NOW}, {u}, {NOW})",
                o.id
            )],
        )
        .await?;

        // Delivery order and its moves, confirmed then reserved.
        let picking = tx
            .insert(
                "stock_picking",
                "name, origin, state, move_type, priority, scheduled_date, location_id, location_dest_id, \
                 picking_type_id, partner_id, company_id, user_id, sale_id, printed, is_locked, \
                 create_uid, create_date, write_uid, write_date",
                &[format!(
                    "('WH/OUT/' || lpad(nextval('ir_sequence_002')::text, 5, '0'), \
                     (SELECT name FROM sale_order WHERE id = {id}), 'draft', 'direct', '0', {NOW}, {STOCK}, {CUSTOMERS}, \
                     {PICK_OUT}, {p}, {COMPANY}, {u}, {id}, false, true, {u}, {NOW}, {u}, {NOW})",
                    id = o.id,
                    p = o.partner_id
                )],
            )
            .await?;
        let picking_id = *picking.first().context("no stock_picking id")?;
        let moves: Vec<String> = o
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let p = &self.products[l.product];
                format!(
                    "({}, 'draft', '0', {NOW}, {COMPANY}, {}, 1, {q}.0, {q}.0, 0, false, {STOCK}, {CUSTOMERS}, {}, \
                     {picking_id}, {PICK_OUT}, {}, {WAREHOUSE}, 'make_to_stock', {}, {u}, {NOW}, {u}, {NOW})",
                    lit(&format!("[{}] {}", p.code, p.name)),
                    p.id,
                    o.partner_id,
                    l.id,
                    i + 1,
                    q = l.qty,
                )
            })
            .collect();
        tx.insert(
            "stock_move",
            "name, state, priority, date, company_id, product_id, product_uom, product_uom_qty, product_qty, \
             quantity, picked, location_id, location_dest_id, partner_id, picking_id, picking_type_id, sale_line_id, \
             warehouse_id, procure_method, sequence, create_uid, create_date, write_uid, write_date",
            &moves,
        )
        .await?;
        tx.exec(
            "stock_move",
            Op::Update,
            &format!(
                "UPDATE stock_move SET state = 'confirmed', reference = p.name, write_date = {NOW} \
                 FROM stock_picking p WHERE p.id = stock_move.picking_id AND stock_move.picking_id = {picking_id}"
            ),
        )
        .await?;
        tx.update_values(
            "stock_quant",
            "reserved_quantity = stock_quant.reserved_quantity + \"__tmp\".qty",
            "id, qty",
            &self.quant_deltas(o),
        )
        .await?;
        tx.exec(
            "stock_move",
            Op::Update,
            &format!(
                "UPDATE stock_move SET state = 'assigned', quantity = product_uom_qty, write_date = {NOW} \
                 WHERE picking_id = {picking_id}"
            ),
        )
        .await?;
        tx.exec(
            "stock_picking",
            Op::Update,
            &format!(
                "UPDATE stock_picking SET state = 'assigned', write_date = {NOW} WHERE id = {picking_id}"
            ),
        )
        .await?;
        tx.exec(
            "sale_order",
            Op::Update,
            &format!(
                "UPDATE sale_order SET delivery_status = 'pending', invoice_status = 'to invoice', write_date = {NOW} \
                 WHERE id = {}",
                o.id
            ),
        )
        .await?;

        // The draft invoice: product lines, one tax line, the receivable line.
        let untaxed: i64 = o.lines.iter().map(|l| l.subtotal_cents).sum();
        let tax: i64 = o.lines.iter().map(|l| l.tax_cents).sum();
        let invoice = tx
            .insert(
                "account_move",
                "name, state, move_type, date, invoice_date, invoice_date_due, invoice_origin, payment_state, \
                 journal_id, company_id, currency_id, partner_id, commercial_partner_id, partner_shipping_id, \
                 invoice_user_id, amount_untaxed, amount_tax, amount_total, amount_residual, posted_before, \
                 create_uid, create_date, write_uid, write_date",
                &[format!(
                    "('/', 'draft', 'out_invoice', current_date, current_date, current_date + 30, \
                     (SELECT name FROM sale_order WHERE id = {id}), 'not_paid', {JOURNAL}, {COMPANY}, {CURRENCY}, {p}, \
                     (SELECT commercial_partner_id FROM res_partner WHERE id = {p}), {p}, {u}, 0, 0, 0, 0, false, \
                     {u}, {NOW}, {u}, {NOW})",
                    id = o.id,
                    p = o.partner_id
                )],
            )
            .await?;
        let invoice_id = *invoice.first().context("no account_move id")?;
        let mut aml = Vec::new();
        for (i, l) in o.lines.iter().enumerate() {
            let p = &self.products[l.product];
            aml.push(format!(
                "({invoice_id}, 'draft', {JOURNAL}, {COMPANY}, {CURRENCY}, {CURRENCY}, {ACC_INCOME}, {}, {}, 1, NULL, \
                 'product', {}, {}, current_date, NULL, {}.0, {}, {}::numeric, {}::numeric, {}::numeric, {}::numeric, \
                 0, {}::numeric, 0, false, {}, {NOW}, {}, {NOW})",
                o.partner_id,
                p.id,
                (i + 1) * 10,
                lit(&format!("[{}] {}", p.code, p.name)),
                l.qty,
                money(p.price_cents),
                money(l.subtotal_cents),
                money(l.subtotal_cents + l.tax_cents),
                money(-l.subtotal_cents),
                money(-l.subtotal_cents),
                money(l.subtotal_cents),
                u,
                u,
            ));
        }
        let n_product = aml.len();
        if tax > 0 {
            aml.push(format!(
                "({invoice_id}, 'draft', {JOURNAL}, {COMPANY}, {CURRENCY}, {CURRENCY}, {ACC_TAX}, {}, NULL, NULL, {TAX_15}, \
                 'tax', 1000, '15%', current_date, NULL, 0, 0, 0, 0, {b}::numeric, {b}::numeric, 0, {}::numeric, 0, false, \
                 {u}, {NOW}, {u}, {NOW})",
                o.partner_id,
                money(tax),
                b = money(-tax),
            ));
        }
        aml.push(format!(
            "({invoice_id}, 'draft', {JOURNAL}, {COMPANY}, {CURRENCY}, {CURRENCY}, {ACC_RECEIVABLE}, {}, NULL, NULL, NULL, \
             'payment_term', 2000, NULL, current_date, current_date + 30, 0, 0, 0, 0, {b}::numeric, {b}::numeric, \
             {b}::numeric, 0, {b}::numeric, false, {u}, {NOW}, {u}, {NOW})",
            o.partner_id,
            b = money(untaxed + tax),
        ));
        let aml_ids = tx
            .insert(
                "account_move_line",
                "move_id, parent_state, journal_id, company_id, company_currency_id, currency_id, account_id, \
                 partner_id, product_id, product_uom_id, tax_line_id, display_type, sequence, name, date, \
                 date_maturity, quantity, price_unit, price_subtotal, price_total, balance, amount_currency, debit, \
                 credit, amount_residual, reconciled, create_uid, create_date, write_uid, write_date",
                &aml,
            )
            .await?;
        let product_aml = &aml_ids[..n_product];
        let tax_rel: Vec<String> = product_aml
            .iter()
            .zip(&o.lines)
            .map(|(aml_id, l)| format!("({aml_id}, {})", if l.taxed { TAX_15 } else { TAX_0 }))
            .collect();
        tx.insert_rel(
            "account_move_line_account_tax_rel",
            "account_move_line_id, account_tax_id",
            &tax_rel,
        )
        .await?;
        let inv_rel: Vec<String> = product_aml
            .iter()
            .zip(&o.lines)
            .map(|(aml_id, l)| format!("({aml_id}, {})", l.id))
            .collect();
        tx.insert_rel(
            "sale_order_line_invoice_rel",
            "invoice_line_id, order_line_id",
            &inv_rel,
        )
        .await?;
        let invoiced: Vec<String> = o
            .lines
            .iter()
            .map(|l| {
                format!(
                    "({}, {}.0::numeric, {}::numeric)",
                    l.id,
                    l.qty,
                    money(l.subtotal_cents)
                )
            })
            .collect();
        tx.update_values(
            "sale_order_line",
            "qty_invoiced = \"__tmp\".qty, qty_to_invoice = 0, invoice_status = 'invoiced', \
             untaxed_amount_invoiced = \"__tmp\".amount, untaxed_amount_to_invoice = 0",
            "id, qty, amount",
            &invoiced,
        )
        .await?;
        tx.exec(
            "account_move",
            Op::Update,
            &format!(
                "UPDATE account_move SET amount_untaxed = {un}, amount_tax = {tx}, amount_total = {tot}, \
                 amount_residual = {tot}, amount_untaxed_signed = {un}, amount_total_signed = {tot}, \
                 amount_residual_signed = {tot}, write_date = {NOW} WHERE id = {invoice_id}",
                un = money(untaxed),
                tx = money(tax),
                tot = money(untaxed + tax)
            ),
        )
        .await?;
        tx.exec(
            "sale_order",
            Op::Update,
            &format!(
                "UPDATE sale_order SET invoice_status = 'invoiced', write_date = {NOW} WHERE id = {}",
                o.id
            ),
        )
        .await?;
        Self::notify(
            &mut tx,
            &[
                Self::bus_row(o.partner_id, "mail.record/insert", "sale.order", o.id),
                Self::bus_row(
                    o.partner_id,
                    "mail.record/insert",
                    "account.move",
                    invoice_id,
                ),
            ],
        )
        .await?;
        tx.commit(self).await?;
        self.to_deliver.push_back(Confirmed {
            order,
            picking_id,
            invoice_id,
        });
        Ok(())
    }

    /// `(quant id, quantity)` per product of an order; one VALUES row per quant,
    /// because `UPDATE .. FROM` applies only one of several rows joining the same target.
    fn quant_deltas(&self, o: &Order) -> Vec<String> {
        let mut per_quant: BTreeMap<i32, i64> = BTreeMap::new();
        for l in &o.lines {
            *per_quant
                .entry(self.products[l.product].quant_id)
                .or_default() += l.qty;
        }
        per_quant
            .into_iter()
            .map(|(q, n)| format!("({q}, {n}.0::numeric)"))
            .collect()
    }

    /// Validates the oldest delivery, then posts its invoice (two transactions,
    /// two users' clicks); half the delivered orders are then locked (`done`).
    async fn deliver_next(&mut self, client: &mut Client) -> Result<()> {
        let Some(c) = self.to_deliver.pop_front() else {
            return Ok(());
        };
        let o = &c.order;
        let picking_id = c.picking_id;
        let mut tx = Tx::begin(client).await?;
        tx.exec(
            "stock_move",
            Op::Update,
            &format!("UPDATE stock_move SET picked = true, write_date = {NOW} WHERE picking_id = {picking_id}"),
        )
        .await?;
        tx.exec(
            "stock_move",
            Op::Update,
            &format!(
                "UPDATE stock_move SET state = 'done', date = {NOW}, write_date = {NOW} WHERE picking_id = {picking_id}"
            ),
        )
        .await?;
        tx.update_values(
            "stock_quant",
            "quantity = stock_quant.quantity - \"__tmp\".qty, \
             reserved_quantity = stock_quant.reserved_quantity - \"__tmp\".qty",
            "id, qty",
            &self.quant_deltas(o),
        )
        .await?;
        tx.exec(
            "stock_picking",
            Op::Update,
            &format!(
                "UPDATE stock_picking SET state = 'done', date_done = {NOW}, write_date = {NOW} WHERE id = {picking_id}"
            ),
        )
        .await?;
        let delivered: Vec<String> = o
            .lines
            .iter()
            .map(|l| format!("({}, {}.0::numeric)", l.id, l.qty))
            .collect();
        tx.update_values(
            "sale_order_line",
            "qty_delivered = \"__tmp\".qty",
            "id, qty",
            &delivered,
        )
        .await?;
        tx.exec(
            "sale_order",
            Op::Update,
            &format!(
                "UPDATE sale_order SET delivery_status = 'full', write_date = {NOW} WHERE id = {}",
                o.id
            ),
        )
        .await?;
        Self::notify(
            &mut tx,
            &[Self::bus_row(
                o.partner_id,
                "mail.record/insert",
                "stock.picking",
                picking_id,
            )],
        )
        .await?;
        tx.commit(self).await?;

        let lock = self.rng.chance(50);
        let mut tx = Tx::begin(client).await?;
        tx.exec(
            "account_move",
            Op::Update,
            &format!(
                "UPDATE account_move SET state = 'posted', \
                 sequence_prefix = 'INV/' || extract(year FROM current_date) || '/', \
                 sequence_number = nextval('ir_sequence_003'), posted_before = true, write_date = {NOW} \
                 WHERE id = {}",
                c.invoice_id
            ),
        )
        .await?;
        tx.exec(
            "account_move",
            Op::Update,
            &format!(
                "UPDATE account_move SET name = sequence_prefix || lpad(sequence_number::text, 5, '0'), \
                 payment_reference = sequence_prefix || lpad(sequence_number::text, 5, '0') WHERE id = {}",
                c.invoice_id
            ),
        )
        .await?;
        tx.exec(
            "account_move_line",
            Op::Update,
            &format!(
                "UPDATE account_move_line SET parent_state = 'posted', move_name = m.name, write_date = {NOW} \
                 FROM account_move m WHERE m.id = account_move_line.move_id AND account_move_line.move_id = {}",
                c.invoice_id
            ),
        )
        .await?;
        if lock {
            tx.exec(
                "sale_order",
                Op::Update,
                &format!(
                    "UPDATE sale_order SET state = 'done', locked = true, write_date = {NOW} WHERE id = {}",
                    o.id
                ),
            )
            .await?;
        }
        tx.commit(self).await
    }

    async fn cancel(&mut self, client: &mut Client, o: Order) -> Result<()> {
        let mut tx = Tx::begin(client).await?;
        tx.exec(
            "sale_order",
            Op::Update,
            &format!(
                "UPDATE sale_order SET state = 'cancel', write_date = {NOW} WHERE id = {}",
                o.id
            ),
        )
        .await?;
        tx.exec(
            "sale_order_line",
            Op::Update,
            &format!(
                "UPDATE sale_order_line SET state = 'cancel', write_date = {NOW} WHERE order_id = {}",
                o.id
            ),
        )
        .await?;
        Self::notify(
            &mut tx,
            &[Self::bus_row(
                o.partner_id,
                "mail.record/update",
                "sale.order",
                o.id,
            )],
        )
        .await?;
        tx.commit(self).await
    }

    /// `unlink()` of a quotation: one DELETE, the lines and their tax links go by
    /// `ON DELETE CASCADE`. The cascaded rows are counted first (this is the only
    /// writer), because a DELETE's row count covers only its own table.
    async fn unlink(&mut self, client: &mut Client, o: Order) -> Result<()> {
        let mut tx = Tx::begin(client).await?;
        let lines = tx
            .scalar(&format!(
                "SELECT count(*) FROM sale_order_line WHERE order_id = {}",
                o.id
            ))
            .await?;
        let rels = tx
            .scalar(&format!(
                "SELECT count(*) FROM account_tax_sale_order_line_rel r \
                 JOIN sale_order_line l ON l.id = r.sale_order_line_id WHERE l.order_id = {}",
                o.id
            ))
            .await?;
        let (n, _) = tx
            .exec(
                "sale_order",
                Op::Delete,
                &format!("DELETE FROM sale_order WHERE id = {}", o.id),
            )
            .await?;
        if n != 1 {
            bail!("sale_order {} was not deleted", o.id);
        }
        tx.also("sale_order_line", Op::Delete, lines as u64);
        tx.also("account_tax_sale_order_line_rel", Op::Delete, rels as u64);
        tx.commit(self).await
    }

    async fn mark_sent(&mut self, client: &mut Client, o: Order) -> Result<()> {
        let mut tx = Tx::begin(client).await?;
        tx.exec(
            "sale_order",
            Op::Update,
            &format!(
                "UPDATE sale_order SET state = 'sent', write_date = {NOW} WHERE id = {}",
                o.id
            ),
        )
        .await?;
        Self::notify(
            &mut tx,
            &[Self::bus_row(
                o.partner_id,
                "mail.record/update",
                "sale.order",
                o.id,
            )],
        )
        .await?;
        tx.commit(self).await
    }

    /// Sign-up of one to three new customers: create, then the recompute of
    /// `commercial_partner_id`, which needs the new ids.
    async fn partner_signup(&mut self, client: &mut Client) -> Result<()> {
        let n = self.rng.range(1, 3);
        let first = [
            "Anne", "Bruno", "Chloé", "Dmitri", "Eve", "Fatima", "Gaël", "Hiro",
        ];
        let last = [
            "Martin", "O'Neil", "Dubois", "Novak", "Schmidt", "Rossi", "Tanaka", "Leroy",
        ];
        let rows: Vec<String> = (0..n)
            .map(|_| {
                let name = format!("{} {}", self.rng.pick(&first), self.rng.pick(&last));
                let email = format!(
                    "{}{}@example.com",
                    name.to_lowercase().replace([' ', '\''], "."),
                    self.rng.below(10_000)
                );
                let lang = if self.rng.chance(40) { "fr_FR" } else { "en_US" };
                format!(
                    "({n}, {n}, 'contact', {lang}, {e}, {e}, false, true, true, 0, 0, 1, {NOW}, 1, {NOW})",
                    n = lit(&name),
                    lang = lit(lang),
                    e = lit(&email)
                )
            })
            .collect();
        let mut tx = Tx::begin(client).await?;
        let new = tx
            .insert(
                "res_partner",
                "name, complete_name, type, lang, email, email_normalized, is_company, partner_share, active, \
                 customer_rank, supplier_rank, create_uid, create_date, write_uid, write_date",
                &rows,
            )
            .await?;
        let values: Vec<String> = new.iter().map(|id| format!("({id}, {id})")).collect();
        tx.update_values(
            "res_partner",
            "commercial_partner_id = \"__tmp\".cp",
            "id, cp",
            &values,
        )
        .await?;
        tx.commit(self).await?;
        self.customers.extend(new);
        Ok(())
    }

    /// A contact edit: the write, then the recompute of a stored dependent field.
    async fn partner_edit(&mut self, client: &mut Client) -> Result<()> {
        let id = *self.rng.pick(&self.customers);
        let phone = format!(
            "+32 470 {:02} {:02} {:02}",
            self.rng.below(100),
            self.rng.below(100),
            self.rng.below(100)
        );
        let mut tx = Tx::begin(client).await?;
        tx.exec(
            "res_partner",
            Op::Update,
            &format!(
                "UPDATE res_partner SET phone = {}, write_uid = 2, write_date = {NOW} WHERE id = {id}",
                lit(&phone)
            ),
        )
        .await?;
        tx.exec(
            "res_partner",
            Op::Update,
            &format!(
                "UPDATE res_partner SET email_normalized = lower(email), write_date = {NOW} WHERE id = {id}"
            ),
        )
        .await?;
        tx.commit(self).await
    }

    /// The cron runner: one job per tick, round robin; the bus GC job deletes
    /// all but the newest 50 notifications.
    async fn cron_tick(&mut self, client: &mut Client) -> Result<()> {
        let job = self.next_cron;
        self.next_cron = job % 4 + 1;
        let mut tx = Tx::begin(client).await?;
        tx.exec(
            "ir_cron",
            Op::Update,
            &format!(
                "UPDATE ir_cron SET lastcall = {NOW}, write_date = {NOW}, \
                 nextcall = {NOW} + make_interval(mins => CASE interval_type \
                   WHEN 'minutes' THEN 1 WHEN 'hours' THEN 60 WHEN 'days' THEN 1440 ELSE 10080 END * interval_number) \
                 WHERE id = {job}"
            ),
        )
        .await?;
        if job == 4 {
            tx.exec(
                "bus_bus",
                Op::Delete,
                "DELETE FROM bus_bus WHERE id < (SELECT max(id) - 50 FROM bus_bus)",
            )
            .await?;
        }
        tx.commit(self).await
    }
}
