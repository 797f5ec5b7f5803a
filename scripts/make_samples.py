"""Writes the sample datasets in this directory (deterministic: run it again and the files do not change).

Every answer is computed or looked up from the small tables below, so each one is correct by construction:
arithmetic, unit conversions, translations, capitals and short facts, in Chinese and English.
Usage: python scripts/make_samples.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "finetune" / "samples"  # data/ in the repo links here

CAPITALS = [  # (country, capital, 国家, 首都)
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("Germany", "Berlin", "德国", "柏林"),
    ("Italy", "Rome", "意大利", "罗马"), ("Spain", "Madrid", "西班牙", "马德里"), ("Egypt", "Cairo", "埃及", "开罗"),
    ("the United Kingdom", "London", "英国", "伦敦"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasília", "巴西", "巴西利亚"), ("India", "New Delhi", "印度", "新德里"),
    ("South Korea", "Seoul", "韩国", "首尔"), ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Vietnam", "Hanoi", "越南", "河内"), ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Greece", "Athens", "希腊", "雅典"), ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"), ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
    ("Switzerland", "Bern", "瑞士", "伯尔尼"), ("Poland", "Warsaw", "波兰", "华沙"),
    ("China", "Beijing", "中国", "北京"), ("New Zealand", "Wellington", "新西兰", "惠灵顿"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"), ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
    ("Austria", "Vienna", "奥地利", "维也纳"), ("Peru", "Lima", "秘鲁", "利马"),
    ("Nigeria", "Abuja", "尼日利亚", "阿布贾"), ("Chile", "Santiago", "智利", "圣地亚哥"),
]
WRONG_CAPITAL = {"Australia": ("Sydney", "悉尼"), "Canada": ("Toronto", "多伦多"), "Brazil": ("Rio de Janeiro", "里约热内卢"),
                 "Turkey": ("Istanbul", "伊斯坦布尔"), "Switzerland": ("Zurich", "苏黎世"), "India": ("Mumbai", "孟买"),
                 "Nigeria": ("Lagos", "拉各斯"), "New Zealand": ("Auckland", "奥克兰"),
                 "Vietnam": ("Ho Chi Minh City", "胡志明市"),
                 "China": ("Shanghai", "上海")}

WORDS = [("apple", "苹果"), ("water", "水"), ("book", "书"), ("cat", "猫"), ("dog", "狗"), ("sun", "太阳"),
         ("moon", "月亮"), ("friend", "朋友"), ("school", "学校"), ("teacher", "老师"), ("computer", "电脑"),
         ("tea", "茶"), ("rain", "雨"), ("mountain", "山"), ("river", "河"), ("flower", "花"), ("bird", "鸟"),
         ("city", "城市"), ("window", "窗户"), ("bread", "面包")]
SENTENCES = [("Good morning.", "早上好。"), ("Thank you.", "谢谢。"), ("How are you?", "你好吗？"),
             ("I like reading books.", "我喜欢读书。"), ("The weather is nice today.", "今天天气很好。"),
             ("Where is the train station?", "火车站在哪里？"), ("I am learning Chinese.", "我在学习中文。"),
             ("Please drink some water.", "请喝点水。"), ("My friend is a teacher.", "我的朋友是一名老师。"),
             ("It is raining outside.", "外面在下雨。")]

FACTS = [  # (question en, answer en, question zh, answer zh)
    ("How many days are there in a week?", "There are 7 days in a week.", "一周有几天？", "一周有 7 天。"),
    ("How many minutes are there in an hour?", "An hour has 60 minutes.", "一小时有多少分钟？", "一小时有 60 分钟。"),
    ("At what temperature does water boil at sea level, in degrees Celsius?",
     "At sea level, water boils at 100 °C.", "在海平面上，水在多少摄氏度沸腾？", "在海平面上，水在 100 °C 沸腾。"),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet.", "哪颗行星被称为红色星球？",
     "火星被称为红色星球。"),
    ("What is the largest planet in the Solar System?", "Jupiter is the largest planet in the Solar System.",
     "太阳系中最大的行星是哪一颗？", "木星是太阳系中最大的行星。"),
    ("How many legs does a spider have?", "A spider has 8 legs.", "蜘蛛有几条腿？", "蜘蛛有 8 条腿。"),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O.", "水的化学式是什么？",
     "水的化学式是 H2O。"),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides.", "六边形有几条边？", "六边形有 6 条边。"),
    ("How many days does a leap year have?", "A leap year has 366 days.", "闰年有多少天？", "闰年有 366 天。"),
    ("How many months are there in a year?", "A year has 12 months.", "一年有几个月？", "一年有 12 个月。"),
    ("What is the freezing point of water in degrees Celsius?", "Water freezes at 0 °C.", "水的冰点是多少摄氏度？",
     "水在 0 °C 结冰。"),
    ("How many seconds are there in a minute?", "A minute has 60 seconds.", "一分钟有多少秒？", "一分钟有 60 秒。"),
]

UNITS = [  # (en from, en to, zh from, zh to, factor)
    ("kilometres", "metres", "千米", "米", 1000), ("kilograms", "grams", "千克", "克", 1000),
    ("hours", "minutes", "小时", "分钟", 60), ("metres", "centimetres", "米", "厘米", 100),
    ("litres", "millilitres", "升", "毫升", 1000), ("minutes", "seconds", "分钟", "秒", 60),
]


def num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def arithmetic(rng: random.Random, zh: bool) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-×")
    result = a + b if op == "+" else a - b if op == "-" else a * b
    if zh:
        word = {"+": "加", "-": "减", "×": "乘以"}[op]
        return f"计算 {a} {word} {b} 等于多少？", f"{a} {op} {b} = {result}。"
    word = {"+": "plus", "-": "minus", "×": "times"}[op]
    return f"What is {a} {word} {b}?", f"{a} {op} {b} = {result}."


def conversion(rng: random.Random, zh: bool) -> tuple[str, str]:
    src, dst, zsrc, zdst, factor = rng.choice(UNITS)
    amount = rng.choice([0.5, 1.5, 2, 3, 4.5, 7, 12, 2.25])
    result = amount * factor
    if zh:
        return f"{num(amount)} {zsrc}等于多少{zdst}？", f"{num(amount)} {zsrc} = {num(result)} {zdst}。"
    return f"Convert {num(amount)} {src} to {dst}.", f"{num(amount)} {src} = {num(result)} {dst}."


def celsius(rng: random.Random, zh: bool) -> tuple[str, str]:
    c = rng.choice(range(-20, 45, 5))
    f = c * 9 // 5 + 32
    if zh:
        return f"{c} 摄氏度是多少华氏度？", f"{c} °C = {f} °F（华氏度 = 摄氏度 × 9/5 + 32）。"
    return f"What is {c} °C in Fahrenheit?", f"{c} °C = {f} °F (F = C × 9/5 + 32)."


def capital(rng: random.Random, zh: bool) -> tuple[str, str]:
    country, city, zcountry, zcity = rng.choice(CAPITALS)
    if zh:
        return f"{zcountry}的首都是哪里？", f"{zcountry}的首都是{zcity}。"
    return f"What is the capital of {country}?", f"The capital of {country} is {city}."


def translation(rng: random.Random, zh: bool) -> tuple[str, str, str]:
    """(instruction, input, output) for alpaca rows."""
    en, cn = rng.choice(WORDS + SENTENCES)
    if zh:
        return "把下面的英文翻译成中文。", en, cn
    return "Translate the following Chinese into English.", cn, en


def fact(rng: random.Random, zh: bool) -> tuple[str, str]:
    q, a, zq, za = rng.choice(FACTS)
    return (zq, za) if zh else (q, a)


QA = [arithmetic, conversion, celsius, capital, fact]


def alpaca(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        zh = i % 2 == 1
        if i % 6 == 5:
            instruction, text, output = translation(rng, zh)
        else:
            instruction, output = QA[i % 5](rng, zh)
            text = ""
        rows.append({"instruction": instruction, "input": text, "output": output})
    return rows


def sharegpt(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        zh = i % 2 == 1
        kind = i % 3
        if kind == 0:  # a calculation, then a follow-up on its result
            a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 50)
            turns = [(f"计算 {a} 乘以 {b}。", f"{a} × {b} = {a * b}。"), (f"再加上 {c} 呢？", f"{a * b} + {c} = {a * b + c}。")] \
                if zh else [(f"What is {a} times {b}?", f"{a} × {b} = {a * b}."),
                            (f"And if you add {c} to that?", f"{a * b} + {c} = {a * b + c}.")]
        elif kind == 1:  # a capital, then the reverse question
            country, city, zcountry, zcity = rng.choice(CAPITALS)
            turns = [(f"{zcountry}的首都是哪里？", f"{zcountry}的首都是{zcity}。"),
                     (f"{zcity}是哪个国家的首都？", f"{zcity}是{zcountry}的首都。")] \
                if zh else [(f"What is the capital of {country}?", f"The capital of {country} is {city}."),
                            (f"Which country has {city} as its capital?", f"{city} is the capital of {country}.")]
        else:  # translate, then translate back, then a unit conversion
            en, cn = rng.choice(WORDS + SENTENCES)
            q, a = conversion(rng, zh)
            turns = [(f"“{en}”用中文怎么说？", cn), (f"那“{cn}”的英文呢？", en), (q, a)] if zh else \
                [(f"How do you say \"{en}\" in Chinese?", cn), (f"And how do you say \"{cn}\" in English?", en), (q, a)]
        conversation = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        row = {"conversations": conversation}
        if i % 4 == 0:
            row["system"] = "你是一个乐于助人的助手。" if zh else "You are a helpful assistant."
        rows.append(row)
    return rows


SYSTEMS = {
    "math": ("You are a concise math tutor. Give the result with one line of working.",
             "你是一名简洁的数学老师，给出结果和一行计算过程。"),
    "translate": ("You translate between English and Chinese. Reply with the translation only.",
                  "你是一名中英翻译，只输出译文。"),
    "geo": ("You are a geography assistant. Answer in one sentence.", "你是一名地理助手，用一句话回答。"),
}


def messages(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        zh = i % 2 == 1
        kind = ("math", "translate", "geo")[i % 3]
        if kind == "math":
            pairs = [rng.choice([arithmetic, conversion, celsius])(rng, zh) for _ in range(1 + i % 2)]
        elif kind == "translate":
            pairs = []
            for _ in range(1 + i % 2):
                en, cn = rng.choice(WORDS + SENTENCES)
                pairs.append((en, cn) if zh else (cn, en))
        else:
            pairs = [capital(rng, zh)]
        convo = [{"role": "system", "content": SYSTEMS[kind][zh]}]
        for q, a in pairs:
            convo += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append({"messages": convo})
    return rows


def preference(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        zh = i % 2 == 1
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(11, 99), rng.randint(11, 99)
            wrong = a + b + rng.choice([-10, -1, 1, 10])
            prompt = f"{a} 加 {b} 等于多少？" if zh else f"What is {a} plus {b}?"
            chosen = f"{a} + {b} = {a + b}。" if zh else f"{a} + {b} = {a + b}."
            rejected = f"{a} + {b} = {wrong}。" if zh else f"{a} + {b} = {wrong}."
        elif kind == 1:
            country, city, zcountry, zcity = rng.choice([c for c in CAPITALS if c[0] in WRONG_CAPITAL])
            wrong, zwrong = WRONG_CAPITAL[country]
            prompt = f"{zcountry}的首都是哪里？" if zh else f"What is the capital of {country}?"
            chosen = f"{zcountry}的首都是{zcity}。" if zh else f"The capital of {country} is {city}."
            rejected = f"{zcountry}的首都是{zwrong}。" if zh else f"The capital of {country} is {wrong}."
        else:
            q, a = conversion(rng, zh)
            prompt, chosen = q, a
            rejected = "我不确定，你可以自己查一下。" if zh else "I'm not sure, you could look it up yourself."
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def text(rng: random.Random) -> list[dict]:
    rows = [{"text": f"{country} is a country whose capital is {city}. {zcountry}的首都是{zcity}。"}
            for country, city, zcountry, zcity in CAPITALS[:16]]
    rows += [{"text": f"{q} {a}\n{zq}{za}"} for q, a, zq, za in FACTS]
    return rows


def write_jsonl(name: str, rows: list[dict]) -> None:
    with (OUT / name).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(20240501)
    (OUT / "alpaca_zh_en.json").write_text(json.dumps(alpaca(rng, 120), ensure_ascii=False, indent=1) + "\n",
                                            encoding="utf-8")
    write_jsonl("sharegpt_multiturn.jsonl", sharegpt(rng, 60))
    write_jsonl("messages_system.jsonl", messages(rng, 72))
    write_jsonl("preference_zh_en.jsonl", preference(rng, 60))
    write_jsonl("text_facts.jsonl", text(rng))


if __name__ == "__main__":
    main()
