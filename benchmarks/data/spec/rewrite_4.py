import csv
import statistics
from dataclasses import dataclass


@dataclass
class Reading:
    station: str
    day: str
    temperature: float
    rainfall: float


def read_readings(path):
    """Read a CSV file with the columns station, day, temperature and rainfall."""
    readings = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                temperature = float(row["temperature"])
                rainfall = float(row["rainfall"])
            except ValueError:
                continue
            readings.append(Reading(row["station"], row["day"], temperature, rainfall))
    return readings


def by_station(readings):
    groups = {}
    for reading in readings:
        groups.setdefault(reading.station, []).append(reading)
    return groups


def station_summary(readings):
    """Mean, lowest and highest temperature and the total rainfall of one station."""
    temperatures = [r.temperature for r in readings]
    return {
        "days": len(readings),
        "mean_temperature": round(statistics.mean(temperatures), 1),
        "lowest": min(temperatures),
        "highest": max(temperatures),
        "rainfall": round(sum(r.rainfall for r in readings), 1),
    }


def wettest_day(readings):
    return max(readings, key=lambda r: r.rainfall).day


def main(path):
    readings = read_readings(path)
    for station, group in sorted(by_station(readings).items()):
        summary = station_summary(group)
        print(f"{station}: {summary['days']} days, mean {summary['mean_temperature']} C")
        print(f"  range {summary['lowest']} to {summary['highest']} C")
        print(f"  rainfall {summary['rainfall']} mm, wettest day {wettest_day(group)}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1])
