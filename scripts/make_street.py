#!/usr/bin/env python3
"""Regenerate registry/default-street.csv, the bulk device registry of the default street.

The default street is a composite of the seed reports: Changqing street's 737 smoke detectors in
the homes of elderly people living alone and its 734 old-compound meter boxes (seed 004), and 15
e-bike charging points (Changqing's 15 points; Xiaohe's "小河安电" monitors, seeds 000/001). The 14
noise monitoring points (Dongxin, seed 003) are listed inline in config.yaml. Coordinates are
synthetic, scattered around each site's centre; ids are stable so a regenerated file is identical.

    python scripts/make_street.py > registry/default-street.csv
"""

import csv
import random
import sys

import yaml

SMOKE_HOMES = {"wangma": 260, "hengyanzi": 190, "fengqi": 170, "xiaohe-zhijie": 117}  # 737 in all
METER_BOXES = {"wangma": 250, "hengyanzi": 180, "fengqi": 160, "xiaohe-zhijie": 144}  # 734 in all
CHARGING_POINTS = {"wangma": 4, "hengyanzi": 3, "fengqi": 3, "xiaohe-zhijie": 2, "canal-cbd": 3}  # 15
BUILDINGS = {"wangma": 38, "hengyanzi": 26, "fengqi": 22, "xiaohe-zhijie": 18}


def main() -> None:
    config = yaml.safe_load(open("config.yaml", encoding="utf-8"))
    sites = {s["id"]: s for s in config["sites"]}
    rng = random.Random(20261122)
    out = csv.writer(sys.stdout, lineterminator="\n")
    print("# The default street's bulk registry; regenerate with scripts/make_street.py (see its docstring).")
    out.writerow(["id", "kind", "site", "lat", "lon", "name", "address", "zone_class", "ports",
                  "rated_power_w", "tags"])

    def near(site: str, spread: float = 0.0012) -> tuple[str, str]:
        s = sites[site]
        return f"{s['lat'] + rng.uniform(-spread, spread):.6f}", f"{s['lon'] + rng.uniform(-spread, spread):.6f}"

    for site, count in SMOKE_HOMES.items():
        for n in range(1, count + 1):
            building, unit = rng.randint(1, BUILDINGS[site]), rng.randint(1, 3)
            room = f"{rng.randint(1, 6)}0{rng.randint(1, 4)}"
            lat, lon = near(site)
            address = f"{sites[site]['name']}{building}幢{unit}单元{room}室"
            out.writerow([f"smk-{site}-{n:03d}", "smoke", site, lat, lon, f"烟感 {building}-{unit}-{room}",
                          address, "", "", "", "elderly_alone"])
    for site, count in METER_BOXES.items():
        for n in range(1, count + 1):
            building = rng.randint(1, BUILDINGS[site])
            lat, lon = near(site)
            out.writerow([f"mtr-{site}-{n:03d}", "meter", site, lat, lon, f"电表箱 {building}幢",
                          f"{sites[site]['name']}{building}幢", "", "", "", ""])
    for site, count in CHARGING_POINTS.items():
        for n in range(1, count + 1):
            lat, lon = near(site, 0.0008)
            # 10 ports per point, each cut off by the post at 1,000 W (GB 42295-2022 field practice:
            # per-port protection at 800-1,000 W).
            out.writerow([f"evc-{site}-{n:02d}", "ev_charger", site, lat, lon, f"充电桩 {n} 号",
                          f"{sites[site]['name']}非机动车棚 {n}", "", 10, 1000, ""])


if __name__ == "__main__":
    main()
