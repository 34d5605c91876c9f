//! Pairs that must and must not match under exact set match, on a small concert schema.

use super::*;

fn catalog() -> Catalog {
    Catalog::new(&[
        ("singer", vec!["singer_id", "name", "country", "age", "song_name"]),
        ("concert", vec!["concert_id", "concert_name", "stadium_id", "year"]),
        ("singer_in_concert", vec!["concert_id", "singer_id"]),
        ("stadium", vec!["stadium_id", "name", "capacity", "location"]),
    ])
    .with_foreign_keys(&[
        ("singer_in_concert.singer_id", "singer.singer_id"),
        ("singer_in_concert.concert_id", "concert.concert_id"),
        ("concert.stadium_id", "stadium.stadium_id"),
    ])
}

/// Whether `pred` matches `gold` (DISTINCT ignored, as by the official evaluator).
fn m(gold: &str, pred: &str) -> bool {
    let hit = exact_match(&catalog(), gold, pred, false);
    assert_eq!(
        hit,
        exact_match(&catalog(), pred, gold, false),
        "not symmetric: {gold} / {pred}"
    );
    hit
}

fn parses(sql: &str) -> bool {
    parse(&catalog(), sql, false).is_ok()
}

#[test]
fn aliases_and_table_names_are_the_same_columns() {
    let gold = "SELECT T1.name FROM singer AS T1 WHERE T1.age > 20";
    assert!(m(gold, "SELECT name FROM singer WHERE age > 20"));
    assert!(m(gold, "select singer.NAME from SINGER where singer.Age > 20;"));
    assert!(m(gold, "SELECT s.name FROM singer s WHERE s.age > 20"));
    assert!(m(gold, "SELECT \"name\" AS n FROM singer WHERE age > 20"));
    assert!(!m(gold, "SELECT T1.country FROM singer AS T1 WHERE T1.age > 20"));
    // A bare column belongs to the first FROM table that has it.
    let join = "SELECT T2.name FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id";
    assert!(m(
        join,
        "SELECT name FROM concert JOIN stadium ON concert.stadium_id = stadium.stadium_id"
    ));
    assert!(!m(
        join,
        "SELECT T1.concert_name FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id"
    ));
}

#[test]
fn where_conditions_and_select_columns_are_sets_and_values_are_ignored() {
    let gold = "SELECT name, country FROM singer WHERE age > 20 AND country = 'France'";
    assert!(m(
        gold,
        "SELECT country, name FROM singer WHERE country = \"USA\" AND age > 30"
    ));
    assert!(m(
        gold,
        "SELECT name, country FROM singer WHERE (country = 'x' AND age > -1.5)"
    ));
    // Operators, connectives and the column a condition tests all count.
    assert!(!m(
        gold,
        "SELECT name, country FROM singer WHERE age >= 20 AND country = 'France'"
    ));
    assert!(!m(
        gold,
        "SELECT name, country FROM singer WHERE age > 20 OR country = 'France'"
    ));
    assert!(!m(
        gold,
        "SELECT name, country FROM singer WHERE age > 20 AND name = 'France'"
    ));
    assert!(!m(gold, "SELECT name, country FROM singer WHERE age > 20"));
    assert!(!m(gold, "SELECT name, country FROM singer"));
    assert!(!m(
        gold,
        "SELECT name, country FROM singer WHERE age > 20 AND country LIKE 'F%'"
    ));
    assert!(!m(
        gold,
        "SELECT name, country, age FROM singer WHERE age > 20 AND country = 'France'"
    ));
    // BETWEEN and NOT BETWEEN.
    let between = "SELECT name FROM singer WHERE age BETWEEN 20 AND 30";
    assert!(m(between, "SELECT name FROM singer WHERE age BETWEEN 1 AND 2"));
    assert!(!m(between, "SELECT name FROM singer WHERE age NOT BETWEEN 20 AND 30"));
    // As in the official evaluator, a right-hand column counts as a value.
    assert!(m(
        "SELECT name FROM singer WHERE age = song_name",
        "SELECT name FROM singer WHERE age = 3"
    ));
}

#[test]
fn order_direction_and_limit_count() {
    let gold = "SELECT name FROM singer ORDER BY age DESC LIMIT 1";
    assert!(m(gold, "SELECT name FROM singer ORDER BY age DESC LIMIT 3"));
    assert!(!m(gold, "SELECT name FROM singer ORDER BY age ASC LIMIT 1"));
    assert!(!m(gold, "SELECT name FROM singer ORDER BY age LIMIT 1"));
    assert!(!m(gold, "SELECT name FROM singer ORDER BY age DESC"), "missing LIMIT");
    assert!(!m(
        "SELECT name FROM singer ORDER BY age",
        "SELECT name FROM singer ORDER BY age LIMIT 5"
    ));
    assert!(!m(gold, "SELECT name FROM singer ORDER BY name DESC LIMIT 1"));
    assert!(m(
        "SELECT name FROM singer ORDER BY age",
        "SELECT name FROM singer ORDER BY age ASC"
    ));
    assert!(!m(
        "SELECT name FROM singer ORDER BY age, name",
        "SELECT name FROM singer ORDER BY name, age"
    ));
    assert!(
        !m("SELECT name FROM singer", "SELECT name FROM singer LIMIT 10"),
        "extra LIMIT"
    );
}

#[test]
fn join_order_does_not_matter_but_the_tables_do() {
    let gold = "SELECT T1.name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id";
    assert!(m(
        gold,
        "SELECT T2.name FROM singer_in_concert AS T1 JOIN singer AS T2 ON T1.singer_id = T2.singer_id"
    ));
    // Join conditions count only through their keywords (as officially), so a comma join matches.
    assert!(m(gold, "SELECT singer.name FROM singer, singer_in_concert"));
    assert!(!m(
        gold,
        "SELECT singer.name FROM singer, singer_in_concert WHERE singer.singer_id = singer_in_concert.singer_id"
    ));
    assert!(m(
        gold,
        "SELECT name FROM singer_in_concert INNER JOIN singer ON singer.singer_id = singer_in_concert.singer_id"
    ));
    assert!(!m(
        gold,
        "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.singer_id = T2.concert_id"
    ));
    assert!(!m(gold, "SELECT name FROM singer"));
    // Columns linked by a foreign key are one column.
    let three = "SELECT T3.concert_name FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id \
                 JOIN concert AS T3 ON T2.concert_id = T3.concert_id GROUP BY T1.singer_id";
    assert!(m(
        three,
        &three.replace("GROUP BY T1.singer_id", "GROUP BY T2.singer_id")
    ));
    assert!(!m(
        three,
        &three.replace("GROUP BY T1.singer_id", "GROUP BY T2.concert_id")
    ));
}

#[test]
fn nested_queries_compare_as_queries() {
    let gold =
        "SELECT name FROM singer WHERE singer_id IN (SELECT singer_id FROM singer_in_concert WHERE concert_id = 1)";
    assert!(m(gold, "SELECT name FROM singer WHERE singer_id IN (SELECT T.singer_id FROM singer_in_concert AS T WHERE T.concert_id = 7)"));
    assert!(!m(
        gold,
        "SELECT name FROM singer WHERE singer_id NOT IN (SELECT singer_id FROM singer_in_concert WHERE concert_id = 1)"
    ));
    assert!(!m(
        gold,
        "SELECT name FROM singer WHERE singer_id IN (SELECT singer_id FROM singer_in_concert)"
    ));
    assert!(!m(
        gold,
        "SELECT name FROM singer WHERE singer_id IN (SELECT concert_id FROM singer_in_concert WHERE concert_id = 1)"
    ));
    assert!(!m(gold, "SELECT name FROM singer WHERE singer_id IN (1, 2, 3)"));
    // Nested conditions are sets too; scalar subqueries nest the same way.
    let avg = "SELECT name FROM singer WHERE age > (SELECT avg(age) FROM singer WHERE country = 'a' AND age < 3)";
    assert!(m(
        avg,
        "SELECT name FROM singer WHERE age > (SELECT avg(age) FROM singer WHERE age < 9 AND country = 'b')"
    ));
    assert!(!m(
        avg,
        "SELECT name FROM singer WHERE age > (SELECT max(age) FROM singer WHERE country = 'a' AND age < 3)"
    ));
    // Inside a nested query the foreign-key map does not apply and DISTINCT counts, as officially.
    let nested = "SELECT name FROM singer WHERE singer_id IN (SELECT T2.singer_id FROM singer AS T1 JOIN singer_in_concert AS T2 ON T1.singer_id = T2.singer_id)";
    assert!(!m(
        nested,
        &nested.replace("SELECT T2.singer_id", "SELECT T1.singer_id")
    ));
    assert!(!m(
        nested,
        &nested.replace("SELECT T2.singer_id", "SELECT DISTINCT T2.singer_id")
    ));
}

#[test]
fn intersect_union_except() {
    let gold = "SELECT name FROM singer WHERE age > 20 INTERSECT SELECT name FROM singer WHERE country = 'x'";
    assert!(m(
        gold,
        "SELECT name FROM singer WHERE age > 40 INTERSECT SELECT T1.name FROM singer AS T1 WHERE T1.country = 'y'"
    ));
    assert!(!m(gold, &gold.replace("INTERSECT", "UNION")));
    assert!(!m(gold, &gold.replace("INTERSECT", "EXCEPT")));
    assert!(!m(gold, "SELECT name FROM singer WHERE age > 20"));
    assert!(!m(
        gold,
        "SELECT name FROM singer WHERE age > 20 INTERSECT SELECT name FROM singer WHERE age = 'x'"
    ));
    let except = "SELECT name FROM stadium EXCEPT SELECT T2.name FROM concert AS T1 JOIN stadium AS T2 ON T1.stadium_id = T2.stadium_id";
    assert!(m(except, "SELECT name FROM stadium EXCEPT SELECT stadium.name FROM stadium JOIN concert ON concert.stadium_id = stadium.stadium_id"));
    assert!(
        !m(except, "SELECT name FROM stadium UNION ALL SELECT name FROM stadium"),
        "UNION ALL is not parsed"
    );
}

#[test]
fn aggregates_count() {
    assert!(!m("SELECT count(*) FROM singer", "SELECT count(singer_id) FROM singer"));
    assert!(m("SELECT count(*) FROM singer", "SELECT COUNT(*) AS total FROM singer"));
    assert!(!m("SELECT max(age) FROM singer", "SELECT min(age) FROM singer"));
    assert!(!m("SELECT max(age) FROM singer", "SELECT age FROM singer"));
    assert!(!m(
        "SELECT max(age), min(age) FROM singer",
        "SELECT max(age) FROM singer"
    ));
    assert!(m(
        "SELECT max(age), min(age) FROM singer",
        "SELECT min(age), max(age) FROM singer"
    ));
    assert!(m(
        "SELECT max(age) - min(age) FROM singer",
        "SELECT max(T.age) - min(T.age) FROM singer AS T"
    ));
    assert!(!m(
        "SELECT max(age) - min(age) FROM singer",
        "SELECT max(age) + min(age) FROM singer"
    ));
    assert!(!m(
        "SELECT avg(age + singer_id) FROM singer",
        "SELECT avg(age) FROM singer"
    ));
    // Outside the select list, an aggregate over arithmetic is one unit.
    let having = "SELECT country FROM singer GROUP BY country HAVING sum(age * singer_id) > 9";
    assert!(m(
        having,
        "SELECT country FROM singer GROUP BY country HAVING sum(singer.age * singer.singer_id) > 1"
    ));
    assert!(!m(
        having,
        "SELECT country FROM singer GROUP BY country HAVING sum(age + singer_id) > 9"
    ));
    assert!(!m(
        having,
        "SELECT country FROM singer GROUP BY country HAVING sum(age) > 9"
    ));
}

#[test]
fn group_by_and_having() {
    let gold = "SELECT country, count(*) FROM singer GROUP BY country HAVING count(*) > 1";
    assert!(m(
        gold,
        "SELECT count(*), country FROM singer GROUP BY country HAVING count(*) > 5"
    ));
    assert!(!m(gold, "SELECT country, count(*) FROM singer GROUP BY country"));
    assert!(!m(
        gold,
        "SELECT country, count(*) FROM singer GROUP BY country HAVING count(*) < 1"
    ));
    assert!(!m(
        gold,
        "SELECT country, count(*) FROM singer GROUP BY country HAVING sum(age) > 1"
    ));
    assert!(!m(
        gold,
        "SELECT country, count(*) FROM singer GROUP BY name HAVING count(*) > 1"
    ));
    assert!(!m(
        gold,
        "SELECT country, count(*) FROM singer WHERE age > 1 GROUP BY country HAVING count(*) > 1"
    ));
}

#[test]
fn distinct_is_ignored_by_default_and_counts_when_kept() {
    let cat = catalog();
    let (a, b) = ("SELECT DISTINCT country FROM singer", "SELECT country FROM singer");
    assert!(
        exact_match(&cat, a, b, false),
        "the official evaluator disables DISTINCT"
    );
    assert!(!exact_match(&cat, a, b, true));
    assert!(exact_match(&cat, a, a, true));
    let (c, d) = (
        "SELECT count(DISTINCT country) FROM singer",
        "SELECT count(country) FROM singer",
    );
    assert!(exact_match(&cat, c, d, false));
    assert!(!exact_match(&cat, c, d, true));
}

#[test]
fn unparseable_predictions_never_match() {
    let gold = "SELECT name FROM singer WHERE age > 20";
    for bad in [
        "SELECT name FROM singer WHERE",
        "SELECT name FROM singer WHERE age > 20 garbage here",
        "SELECT nickname FROM singer WHERE age > 20",
        "SELECT name FROM singers WHERE age > 20",
        "SELECT T9.name FROM singer AS T1 WHERE age > 20",
        "SELECT name FROM singer LEFT JOIN concert WHERE age > 20",
        "SELECT name WHERE age > 20",
        "SELEC name FROM singer",
        "",
    ] {
        assert!(!parses(bad), "{bad}");
        assert!(!m(gold, bad), "{bad}");
    }
    let deep = format!(
        "SELECT name FROM singer WHERE age > {}1{}",
        "(".repeat(500),
        ")".repeat(500)
    );
    assert!(
        !parses(&deep),
        "nesting past the limit is refused, not a stack overflow"
    );
}

#[test]
fn unparseable_gold_falls_back_to_text() {
    let gold = "SELECT upper(name) FROM singer";
    assert!(!parses(gold));
    assert!(m(gold, "select  UPPER(name) from singer;"));
    assert!(!m(gold, "SELECT lower(name) FROM singer"));
}

#[test]
fn from_subqueries_and_correlated_columns_parse() {
    let sub = "SELECT count(*) FROM (SELECT country FROM singer GROUP BY country)";
    assert!(m(
        sub,
        "SELECT count(*) FROM (SELECT country FROM singer GROUP BY country) AS t"
    ));
    assert!(!m(sub, "SELECT count(*) FROM (SELECT name FROM singer GROUP BY name)"));
    assert!(parses(
        "SELECT T.country FROM (SELECT country FROM singer) AS T WHERE T.country = 'x'"
    ));
    assert!(parses(
        "SELECT name FROM singer AS S WHERE age > (SELECT avg(age) FROM singer WHERE country = S.country)"
    ));
    assert!(parses(
        "SELECT name FROM singer WHERE song_name IS NOT NULL AND NOT age = 3"
    ));
}
