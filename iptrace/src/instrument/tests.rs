use super::*;

#[test]
fn a_burst_beyond_a_days_packets_does_not_fit_hashlimit() {
    let fits = |text: &str, burst| Limit::parse(text, burst).unwrap().fits_hashlimit();
    assert!(fits("1/day", 1) && !fits("1/day", 2));
    assert!(fits("1/hour", 24) && !fits("1/hour", 25));
    assert!(fits("1/second", 10_000) && fits("10/minute", 10_000));
}

#[test]
fn limits_parse_like_iptables() {
    assert_eq!(Limit::parse("1/second", 5).unwrap().to_string(), "1/sec");
    assert_eq!(Limit::parse("10/s", 5).unwrap().to_string(), "10/sec");
    assert_eq!(Limit::parse("5/minute", 1).unwrap().to_string(), "5/min");
    assert_eq!(Limit::parse("7", 1).unwrap().to_string(), "7/sec");
    for bad in ["0/s", "x/s", "5/fortnight", "-1"] {
        assert!(Limit::parse(bad, 5).is_err(), "{bad}");
    }
    assert!(Limit::parse("1/s", 0).is_err());
}
