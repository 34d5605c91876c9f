//! The bundled example: a small shop database that sqlora writes itself (categories, products,
//! users, orders, order items, with dates), and a generator of question/SQL pairs over it covering
//! filters, joins, aggregation, GROUP BY/HAVING, date ranges, ORDER BY/LIMIT, nesting and set
//! operations. Every pair is executed and kept only if it runs and returns rows.

use crate::sql::data::Example;
use crate::sql::exec::Db;
use crate::sql::schema::Schema;
use crate::util::rng::Rng;
use anyhow::{Context, Result};
use rusqlite::{params, Connection};
use std::path::Path;
use std::time::Duration;

const CATEGORIES: [&str; 8] = [
    "Books",
    "Electronics",
    "Garden",
    "Toys",
    "Kitchen",
    "Sports",
    "Music",
    "Clothing",
];
const ADJECTIVES: [&str; 8] = [
    "Classic", "Compact", "Deluxe", "Eco", "Pocket", "Pro", "Smart", "Vintage",
];
const NOUNS: [[&str; 4]; 8] = [
    ["Novel", "Atlas", "Cookbook", "Journal"],
    ["Headphones", "Charger", "Speaker", "Keyboard"],
    ["Shovel", "Planter", "Hose", "Rake"],
    ["Puzzle", "Robot", "Kite", "Blocks"],
    ["Kettle", "Skillet", "Blender", "Knife"],
    ["Racket", "Football", "Yoga Mat", "Helmet"],
    ["Guitar", "Vinyl", "Ukulele", "Metronome"],
    ["Jacket", "Scarf", "Sneakers", "Hat"],
];
const FIRST: [&str; 20] = [
    "Ada", "Bruno", "Chen", "Dara", "Elif", "Farah", "Goran", "Hana", "Ines", "Jonas", "Kemal", "Lena", "Mateo", "Nia",
    "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
];
const LAST: [&str; 8] = ["Novak", "Silva", "Okafor", "Larsen", "Moreau", "Ito", "Costa", "Weber"];
const CITIES: [&str; 7] = ["Lisbon", "Oslo", "Lagos", "Osaka", "Lyon", "Bremen", "Porto"];
const STATUSES: [&str; 5] = ["pending", "paid", "shipped", "delivered", "cancelled"];
const DOMAINS: [&str; 3] = ["mail.com", "post.net", "inbox.org"];

/// A date `days` after 2023-01-01, as YYYY-MM-DD.
fn date(days: u64) -> String {
    let month_len = |y: u64, m: u64| match m {
        2 if y.is_multiple_of(4) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let (mut y, mut m, mut d) = (2023, 1, days + 1);
    while d > month_len(y, m) {
        d -= month_len(y, m);
        m += 1;
        if m > 12 {
            m = 1;
            y += 1;
        }
    }
    format!("{y:04}-{m:02}-{d:02}")
}

/// Write the shop database to `path` (replaced if present; built beside it and renamed into place).
pub fn write_shop_db(path: &Path) -> Result<()> {
    let tmp = path.with_extension("sqlite.partial");
    let _ = std::fs::remove_file(&tmp);
    let mut conn = Connection::open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    conn.execute_batch(
        "CREATE TABLE categories (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
         CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL,
             category_id INTEGER NOT NULL REFERENCES categories(id), price REAL NOT NULL, stock INTEGER NOT NULL);
         CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL,
             city TEXT NOT NULL, joined_on TEXT NOT NULL);
         CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
             placed_on TEXT NOT NULL, status TEXT NOT NULL);
         CREATE TABLE order_items (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL REFERENCES orders(id),
             product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL, unit_price REAL NOT NULL);",
    )?;
    let mut rng = Rng::new(2024);
    let tx = conn.transaction()?;
    for (i, c) in CATEGORIES.iter().enumerate() {
        tx.execute("INSERT INTO categories VALUES (?1, ?2)", params![i as i64 + 1, c])?;
    }
    let mut prices = Vec::new();
    let mut pid = 0i64;
    for (ci, nouns) in NOUNS.iter().enumerate() {
        for noun in nouns {
            for _ in 0..2 {
                pid += 1;
                let adj = ADJECTIVES[rng.below(ADJECTIVES.len() as u64) as usize];
                let price = (rng.uniform_in(3.0, 250.0) * 100.0).round() / 100.0;
                let stock = if rng.below(6) == 0 {
                    0
                } else {
                    rng.below(120) as i64 + 1
                };
                let name = format!("{adj} {noun} {pid}");
                tx.execute(
                    "INSERT INTO products VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![pid, name, ci as i64 + 1, price as f64, stock],
                )?;
                prices.push(price as f64);
            }
        }
    }
    for u in 0..40i64 {
        let (f, l) = (FIRST[u as usize % FIRST.len()], LAST[(u as usize * 3 + 1) % LAST.len()]);
        let name = format!("{f} {l}");
        let email = format!(
            "{}.{}@{}",
            f.to_lowercase(),
            l.to_lowercase(),
            DOMAINS[u as usize % DOMAINS.len()]
        );
        let city = CITIES[rng.below(CITIES.len() as u64) as usize];
        tx.execute(
            "INSERT INTO users VALUES (?1, ?2, ?3, ?4, ?5)",
            params![u + 1, name, email, city, date(rng.below(600))],
        )?;
    }
    let mut item = 0i64;
    for o in 1..=320i64 {
        // Users 33..40 never order, so "users without orders" has an answer.
        let user = rng.below(32) as i64 + 1;
        let status = STATUSES[rng.below(STATUSES.len() as u64) as usize];
        tx.execute(
            "INSERT INTO orders VALUES (?1, ?2, ?3, ?4)",
            params![o, user, date(rng.below(730)), status],
        )?;
        for _ in 0..1 + rng.below(4) {
            item += 1;
            let p = rng.below(pid as u64) as i64 + 1;
            let qty = rng.below(5) as i64 + 1;
            tx.execute(
                "INSERT INTO order_items VALUES (?1, ?2, ?3, ?4, ?5)",
                params![item, o, p, qty, prices[p as usize - 1]],
            )?;
        }
    }
    tx.commit()?;
    drop(conn);
    std::fs::rename(&tmp, path).with_context(|| format!("moving {} into place", path.display()))
}

/// One question template: paraphrases with `{0}`, `{1}` slots, the SQL, and a query that lists
/// candidate slot values (one row per candidate).
struct Template {
    questions: &'static [&'static str],
    sql: &'static str,
    slots: &'static str,
}

const TEMPLATES: &[Template] = &[
    Template { questions: &["How many users are there?", "Count the users."], sql: "SELECT count(*) FROM users", slots: "" },
    Template { questions: &["How many products are in the {0} category?", "Count the {0} products."],
        sql: "SELECT count(*) FROM products AS p JOIN categories AS c ON p.category_id = c.id WHERE c.name = '{0}'",
        slots: "SELECT name FROM categories" },
    Template { questions: &["List the names of users who live in {0}.", "Which users are from {0}?"],
        sql: "SELECT name FROM users WHERE city = '{0}'", slots: "SELECT DISTINCT city FROM users" },
    Template { questions: &["What is the average price of products?", "Give the mean product price."],
        sql: "SELECT avg(price) FROM products", slots: "" },
    Template { questions: &["What is the most expensive product?", "Which product has the highest price?"],
        sql: "SELECT name FROM products ORDER BY price DESC LIMIT 1", slots: "" },
    Template { questions: &["List the {0} cheapest products with their prices.", "Show the {0} lowest-priced products and their prices."],
        sql: "SELECT name, price FROM products ORDER BY price ASC LIMIT {0}", slots: "SELECT value FROM (SELECT 3 AS value UNION SELECT 5 UNION SELECT 10)" },
    Template { questions: &["How many orders were placed between {0} and {1}?", "Count the orders from {0} to {1}."],
        sql: "SELECT count(*) FROM orders WHERE placed_on BETWEEN '{0}' AND '{1}'",
        slots: "SELECT a.placed_on, b.placed_on FROM orders AS a JOIN orders AS b ON b.id = a.id + 40 WHERE a.placed_on < b.placed_on" },
    Template { questions: &["How many orders have status {0}?", "Count the {0} orders."],
        sql: "SELECT count(*) FROM orders WHERE status = '{0}'", slots: "SELECT DISTINCT status FROM orders" },
    Template { questions: &["Which categories have more than {0} products in stock?", "List categories with over {0} products that are in stock."],
        sql: "SELECT c.name FROM categories AS c JOIN products AS p ON p.category_id = c.id WHERE p.stock > 0 GROUP BY c.id HAVING count(*) > {0}",
        slots: "SELECT value FROM (SELECT 4 AS value UNION SELECT 5 UNION SELECT 6)" },
    Template { questions: &["How many orders has each user placed? Give names and counts.", "For every user with orders, show the name and the number of orders."],
        sql: "SELECT u.name, count(*) FROM users AS u JOIN orders AS o ON o.user_id = u.id GROUP BY u.id", slots: "" },
    Template { questions: &["What is the total quantity sold of {0}?", "How many units of {0} were ordered in total?"],
        sql: "SELECT sum(oi.quantity) FROM order_items AS oi JOIN products AS p ON oi.product_id = p.id WHERE p.name = '{0}'",
        slots: "SELECT DISTINCT p.name FROM products AS p JOIN order_items AS oi ON oi.product_id = p.id" },
    Template { questions: &["Which products cost more than the average product price?", "List products priced above the average."],
        sql: "SELECT name FROM products WHERE price > (SELECT avg(price) FROM products)", slots: "" },
    Template { questions: &["List the users who have never placed an order.", "Which users have no orders?"],
        sql: "SELECT name FROM users WHERE id NOT IN (SELECT user_id FROM orders)", slots: "" },
    Template { questions: &["What is the total revenue of orders placed in {0}?", "How much was sold in {0}, in total?"],
        sql: "SELECT sum(oi.quantity * oi.unit_price) FROM order_items AS oi JOIN orders AS o ON oi.order_id = o.id WHERE o.placed_on LIKE '{0}-%'",
        slots: "SELECT DISTINCT substr(placed_on, 1, 4) FROM orders" },
    Template { questions: &["Which city has the most users?", "What city do most users live in?"],
        sql: "SELECT city FROM users GROUP BY city ORDER BY count(*) DESC LIMIT 1", slots: "" },
    Template { questions: &["List the names of products that are out of stock.", "Which products have no stock left?"],
        sql: "SELECT name FROM products WHERE stock = 0", slots: "" },
    Template { questions: &["How many users joined after {0}?", "Count the users who signed up later than {0}."],
        sql: "SELECT count(*) FROM users WHERE joined_on > '{0}'", slots: "SELECT joined_on FROM users" },
    Template { questions: &["What is the email of {0}?", "Give the email address of {0}."],
        sql: "SELECT email FROM users WHERE name = '{0}'", slots: "SELECT name FROM users" },
    Template { questions: &["In which cities do users who ordered {0} live?", "List the cities of customers who bought {0}."],
        sql: "SELECT DISTINCT u.city FROM users AS u JOIN orders AS o ON o.user_id = u.id JOIN order_items AS oi ON oi.order_id = o.id JOIN products AS p ON p.id = oi.product_id WHERE p.name = '{0}'",
        slots: "SELECT DISTINCT p.name FROM products AS p JOIN order_items AS oi ON oi.product_id = p.id" },
    Template { questions: &["Show each category with its average product price, highest first.", "List categories by average price, from most to least expensive."],
        sql: "SELECT c.name, avg(p.price) FROM categories AS c JOIN products AS p ON p.category_id = c.id GROUP BY c.id ORDER BY avg(p.price) DESC", slots: "" },
    Template { questions: &["How many products cost between {0} and {1} dollars?", "Count the products priced from {0} to {1}."],
        sql: "SELECT count(*) FROM products WHERE price BETWEEN {0} AND {1}",
        slots: "SELECT a, b FROM (SELECT 10 AS a, 50 AS b UNION SELECT 20, 100 UNION SELECT 50, 150 UNION SELECT 100, 250)" },
    Template { questions: &["Which users placed orders in both {0} and {1}?", "List the users who ordered in {0} and also in {1}."],
        sql: "SELECT u.name FROM users AS u JOIN orders AS o ON o.user_id = u.id WHERE o.placed_on LIKE '{0}-%' INTERSECT SELECT u.name FROM users AS u JOIN orders AS o ON o.user_id = u.id WHERE o.placed_on LIKE '{1}-%'",
        slots: "SELECT '2023', '2024'" },
    Template { questions: &["List the {0} products that cost less than {1} dollars.", "Which {0} products are cheaper than {1}?"],
        sql: "SELECT p.name FROM products AS p JOIN categories AS c ON p.category_id = c.id WHERE c.name = '{0}' AND p.price < {1}",
        slots: "SELECT c.name, v FROM categories AS c JOIN (SELECT 50 AS v UNION SELECT 100 UNION SELECT 200)" },
    Template { questions: &["How many orders were placed in month {1} of {0}?", "Count the orders from {0}-{1}."],
        sql: "SELECT count(*) FROM orders WHERE placed_on LIKE '{0}-{1}-%'",
        slots: "SELECT DISTINCT substr(placed_on, 1, 4), substr(placed_on, 6, 2) FROM orders" },
    Template { questions: &["Which users have an email at {0}?", "List the users whose email ends with @{0}."],
        sql: "SELECT name FROM users WHERE email LIKE '%@{0}'", slots: "SELECT 'mail.com' UNION SELECT 'post.net' UNION SELECT 'inbox.org'" },
    Template { questions: &["What is the largest number of items in a single order?", "Find the maximum item count of any order."],
        sql: "SELECT max(n) FROM (SELECT count(*) AS n FROM order_items GROUP BY order_id)", slots: "" },
    Template { questions: &["Which users spent more than {0} dollars in total? Show names and totals.", "List the customers whose total spending exceeds {0}, with their totals."],
        sql: "SELECT u.name, sum(oi.quantity * oi.unit_price) FROM users AS u JOIN orders AS o ON o.user_id = u.id JOIN order_items AS oi ON oi.order_id = o.id GROUP BY u.id HAVING sum(oi.quantity * oi.unit_price) > {0}",
        slots: "SELECT 2000 UNION SELECT 3000 UNION SELECT 4000" },
    Template { questions: &["How many distinct products has {0} ordered?", "Count the different products bought by {0}."],
        sql: "SELECT count(DISTINCT oi.product_id) FROM order_items AS oi JOIN orders AS o ON oi.order_id = o.id JOIN users AS u ON o.user_id = u.id WHERE u.name = '{0}'",
        slots: "SELECT DISTINCT u.name FROM users AS u JOIN orders AS o ON o.user_id = u.id" },
];

/// Generate up to `per_template` verified pairs per template (fewer when the slot candidates run
/// out), seeded. The schema snippet is the whole shop schema with sample values.
pub fn generate_pairs(db_path: &Path, per_template: usize, seed: u64) -> Result<Vec<Example>> {
    let db = Db::open(db_path)?;
    let schema = Schema::from_sqlite(db_path, 3)?.render_all();
    let limit = Duration::from_secs(5);
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let show = |k: &crate::sql::exec::Key| match k {
        crate::sql::exec::Key::Int(i) => i.to_string(),
        crate::sql::exec::Key::Real(b) => f64::from_bits(*b).to_string(),
        crate::sql::exec::Key::Text(s) => s.clone(),
        other => format!("{other:?}"),
    };
    for (ti, t) in TEMPLATES.iter().enumerate() {
        let candidates: Vec<Vec<String>> = if t.slots.is_empty() {
            vec![vec![]]
        } else {
            let rows = db
                .query(t.slots, limit)
                .map_err(|e| anyhow::anyhow!("template {ti} slots: {e}"))?;
            rows.iter().map(|r| r.iter().map(show).collect()).collect()
        };
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        for j in (1..order.len()).rev() {
            order.swap(j, rng.below(j as u64 + 1) as usize);
        }
        let mut made = 0;
        for &c in &order {
            if made == per_template {
                break;
            }
            let fill = |s: &str| {
                candidates[c]
                    .iter()
                    .enumerate()
                    .fold(s.to_string(), |acc, (k, v)| acc.replace(&format!("{{{k}}}"), v))
            };
            let sql = fill(t.sql);
            match db.query(&sql, limit) {
                Ok(rows) if !rows.is_empty() && rows[0].iter().all(|v| *v != crate::sql::exec::Key::Null) => {}
                Ok(_) => continue,
                Err(e) => anyhow::bail!("template {ti} produced failing SQL {sql}: {e}"),
            }
            let q = t.questions[made % t.questions.len()];
            out.push(Example {
                instruction: fill(q),
                input: schema.clone(),
                output: sql,
                db_id: Some("shop".into()),
                db_path: None,
            });
            made += 1;
        }
    }
    Ok(out)
}

/// Write the shop database and its pairs into `dir`: shop.sqlite, train.jsonl and val.jsonl (every
/// tenth pair, chosen by a seeded shuffle). The examples refer to the database as `db_path`
/// "shop.sqlite", relative to the JSONL file.
pub fn write_shop_dataset(dir: &Path, per_template: usize, seed: u64) -> Result<(usize, usize)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let db = dir.join("shop.sqlite");
    write_shop_db(&db)?;
    let mut pairs = generate_pairs(&db, per_template, seed)?;
    let mut rng = Rng::new(seed ^ 0x5eed);
    for j in (1..pairs.len()).rev() {
        pairs.swap(j, rng.below(j as u64 + 1) as usize);
    }
    for p in &mut pairs {
        p.db_id = None;
        p.db_path = Some("shop.sqlite".into());
    }
    let n_val = pairs.len() / 10;
    let (val, train) = pairs.split_at(n_val);
    crate::sql::data::write_jsonl(&dir.join("train.jsonl"), train)?;
    crate::sql::data::write_jsonl(&dir.join("val.jsonl"), val)?;
    Ok((train.len(), val.len()))
}
