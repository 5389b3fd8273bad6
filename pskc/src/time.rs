//! `xs:dateTime` to Unix seconds (the subset RFC 6030 files use).

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses `YYYY-MM-DDThh:mm:ss[.fff][Z|(+|-)hh:mm]` (no zone: UTC) to Unix seconds.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let (date, rest) = s.split_once('T')?;
    let mut dp = date.splitn(3, '-');
    let (y, mo, d) = (num(dp.next()?)?, num(dp.next()?)?, num(dp.next()?)?);
    // Years of four digits (xs:dateTime allows more; no key file needs them, and a
    // bounded year keeps the arithmetic below from overflowing: found by fuzzing).
    if date.len() < 10
        || !(1..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&d)
    {
        return None;
    }
    let (time, offset) = if let Some(t) = rest.strip_suffix('Z') {
        (t, 0)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let (t, z) = rest.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (zh, zm) = z[1..].split_once(':')?;
        let (zh, zm) = (num(zh)?, num(zm)?);
        if zh > 14 || zm > 59 {
            return None;
        }
        (t, sign * (zh * 3600 + zm * 60))
    } else {
        (rest, 0)
    };
    let mut tp = time.splitn(3, ':');
    let (h, mi, sec) = (tp.next()?, tp.next()?, tp.next()?);
    let sec = sec.split_once('.').map_or(sec, |(s, frac)| {
        if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
            "x"
        } else {
            s
        }
    });
    let (h, mi, sec) = (num(h)?, num(mi)?, num(sec)?);
    if h > 24 || mi > 59 || sec > 60 || (h == 24 && (mi != 0 || sec != 0)) {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

#[cfg(test)]
mod tests {
    use super::parse_datetime;

    #[test]
    fn parses_the_rfc_dates() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_datetime("2006-05-01T00:00:00Z"), Some(1_146_441_600));
        assert_eq!(
            parse_datetime("2006-05-01T02:00:00+02:00"),
            Some(1_146_441_600)
        );
        assert_eq!(
            parse_datetime("2006-05-01T00:00:00.5Z"),
            Some(1_146_441_600)
        );
        assert_eq!(parse_datetime("2006-05-01T00:00:00"), Some(1_146_441_600));
        assert_eq!(parse_datetime("2006-13-01T00:00:00Z"), None);
        assert_eq!(parse_datetime("2006-05-01"), None);
        assert_eq!(parse_datetime("yesterday"), None);
        assert_eq!(
            parse_datetime("9999-12-31T23:59:59Z"),
            Some(253_402_300_799)
        );
        // A year this long overflowed the day count (a panic with overflow checks on).
        assert_eq!(parse_datetime("2006999999999999-05-31T00:00:00Z"), None);
        assert_eq!(parse_datetime("99999-05-31T00:00:00Z"), None);
        assert_eq!(parse_datetime("0000-05-31T00:00:00Z"), None);
    }
}
