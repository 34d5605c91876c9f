//! The guard's checks on a small schema; tests/guard.rs runs it over Spider's gold queries.

use super::*;

fn names() -> Names {
    Names::from_pairs(&[
        ("drivers", &["driverId", "forename", "surname"]),
        ("races", &["raceId", "name", "year"]),
        ("results", &["raceId", "driverId", "points"]),
    ])
}

fn ok(sql: &str) -> bool {
    check(&names(), sql, false).is_ok()
}

#[test]
fn valid_queries_pass_at_every_prefix() {
    let valid = [
        "SELECT T1.forename , T3.name FROM drivers AS T1 JOIN results AS T2 ON T1.driverId = T2.driverId \
         JOIN races AS T3 ON T3.raceId = T2.raceId WHERE T3.year > 2004",
        "SELECT count(*) FROM races WHERE name = \"Australian Grand Prix\" AND year = 2009",
        "SELECT surname FROM drivers WHERE driverId IN (SELECT T1.driverId FROM results AS T1 \
         GROUP BY T1.driverId HAVING sum(T1.points) > 10) ORDER BY surname",
        "SELECT name , count(*) AS cnt FROM races GROUP BY name ORDER BY cnt DESC LIMIT 1",
        "SELECT forename FROM drivers EXCEPT SELECT T1.forename FROM drivers AS T1 JOIN results AS T2 \
         ON T1.driverId = T2.driverId",
        "SELECT CAST(sum(points) AS REAL) / count(*) FROM results",
        "SELECT avg(points) FROM (SELECT points FROM results WHERE raceId = 3)",
        "SELECT DISTINCT drivers.surname FROM drivers JOIN results ON drivers.driverId = results.driverId",
    ];
    for sql in valid {
        for (k, _) in sql.char_indices() {
            assert!(
                ok(&sql[..k]),
                "refused {:?}: {:?}",
                &sql[..k],
                check(&names(), &sql[..k], false)
            );
        }
        assert_eq!(check(&names(), sql, true), Ok(()), "{sql}");
    }
}

#[test]
fn names_the_schema_lacks_are_refused_as_they_are_typed() {
    assert!(ok("SELECT T1.fore"));
    assert!(!ok("SELECT T1.forx"), "begins no column");
    assert!(
        !ok("SELECT count(*) FROM driverz"),
        "no such table, once a letter is wrong"
    );
    assert!(ok("SELECT count(*) FROM driv"));
    assert!(
        !ok("SELECT count(*) FROM drivers WHERE age "),
        "a whole name no table has"
    );
    // Bound: T1 is drivers, which has no name.
    assert!(!ok("SELECT * FROM drivers AS T1 WHERE T1.name"));
    assert!(ok("SELECT * FROM drivers AS T1 WHERE T1.surname"));
    // Used before bound: the k-th table of the FROM clause is Tk, so it must have what Tk was used for.
    assert!(!ok("SELECT T1.year FROM d"), "drivers has no year; races does");
    assert!(ok("SELECT T1.year FROM races AS T1"));
    assert!(ok("SELECT T1.year , T2.surname FROM races AS T1 JOIN drivers AS T2"));
    assert!(!ok("SELECT T1.year , T2.surname FROM races AS T1 JOIN ra"));
    // Bound against the convention: checked when the query ends.
    let against = "SELECT T1.year FROM races AS T2 JOIN drivers AS T1";
    assert!(ok(against));
    assert!(check(&names(), against, true).is_err());
    // Bare columns of the select list: refused when the FROM clause ends without them.
    assert!(ok("SELECT year , surname FROM drivers"));
    assert!(!ok("SELECT year , surname FROM drivers WHERE"));
    assert!(check(&names(), "SELECT year , surname FROM drivers", true).is_err());
    assert!(ok(
        "SELECT year , surname FROM drivers JOIN races ON drivers.driverId = races.raceId WHERE"
    ));
    // A qualifier must be a table or alias of the query by the time the FROM clause has begun.
    assert!(!ok("SELECT * FROM drivers WHERE races.year"));
    assert!(!ok("SELECT * FROM drivers AS T1 WHERE T2.surname"));
    assert!(check(&names(), "SELECT T2.surname FROM drivers AS T1", true).is_err());
    // A keyword run into a name is not an alias; a whole word of the select list must be a column.
    assert!(!ok("SELECT surname FROM drivers WHEREsurname"));
    assert!(ok("SELECT surname FROM drivers T1 WHERE T1.surname"));
    assert!(!ok("SELECT sur FROM"));
    assert!(!ok("SELECT * FROM main.drivers"));
    // After the FROM clause, bare columns must be in its tables at once.
    assert!(!ok("SELECT * FROM drivers WHERE year "));
    assert!(ok("SELECT * FROM drivers WHERE surname "));
}

#[test]
fn a_derived_tables_own_names_are_refused_before_it_is_written() {
    // The guard's one refusal of SQL that runs (see the module's documentation).
    assert!(!ok("SELECT avg(n) FROM"));
    assert!(ok(
        "SELECT count(*) FROM (SELECT count(*) AS n FROM results GROUP BY raceId) WHERE n > 1"
    ));
}

#[test]
fn strings_and_other_statements_are_not_checked() {
    assert!(ok(
        "SELECT * FROM drivers WHERE surname = \"no such col\" AND forename = 'x y"
    ));
    assert!(ok("SELECT * FROM drivers; SELECT nonsense"));
    assert!(check(&names(), "WITH x AS (SELECT 1) SELECT * FROM x", true).is_ok());
}

#[test]
fn subqueries_rebind_their_aliases() {
    // The inner T1 is results, bound by the inner FROM: its select list may not use the outer T1.
    let sql = "SELECT T1.surname FROM drivers AS T1 WHERE T1.driverId IN (SELECT T1.points FROM results AS T1";
    assert!(ok(sql));
    let bad = "SELECT T1.surname FROM drivers AS T1 WHERE T1.driverId IN (SELECT T1.year FROM results AS T1";
    assert!(!ok(bad));
}
