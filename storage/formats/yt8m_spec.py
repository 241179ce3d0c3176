"""YouTube-8M as the project reads it: sizes, quantization and the two levels, in one place.

Facts from ../shared/reference/yt8m_reference.md (section 2; top_k from sections 4 and 5), checked
against it by tests/test_yt8m_spec.py. Pure Python with neither numpy nor torch imported, so DAG files
and the CLI can import it cheaply; the two quantization functions work on the arrays they are given
through those arrays' own operators and methods.
"""

from typing import NamedTuple

from storage.errors import VtagError

RGB_DIM = 1024  # uint8 values a frame (frame level) or float32 means a video (video level)
AUDIO_DIM = 128
NUM_CLASSES = 3862  # the 2nd edition's vocabulary: labels are 0..3861
MAX_FRAMES = 300  # Google's readers cap a video here (one frame a second)
TOP_K = 20  # GAP@20, and the labels a video keeps in Google's inference CSV
# Google's ids are 4 characters (test split) to 11 (YouTube ids); the catalogue's columns are this wide, and
# decoders refuse a longer id: SQLite would store it as is and PostgreSQL refuse it mid-transaction.
MAX_ID_LENGTH = 32
# Text with a NUL byte: PostgreSQL's text types refuse it mid-transaction, SQLite stores it; every input that
# reaches a text column (ids, vocabulary fields, query parameters) is refused on both, with this reason.
NUL_REFUSED = "PostgreSQL cannot store one, so neither database takes it"

# Google's feature extractor clips features to [QUANTIZE_MIN, QUANTIZE_MAX] and spreads them over 0..255.
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0
QUANTIZE_LEVELS = 255
# utils.py Dequantize: x = q * 4/255 + 4/512 - 2. The 4/512 is just under half a step (4/255), so every
# level dequantizes to a value that quantizes back to it.
DEQUANTIZE_SCALE = (QUANTIZE_MAX - QUANTIZE_MIN) / QUANTIZE_LEVELS
DEQUANTIZE_OFFSET = (QUANTIZE_MAX - QUANTIZE_MIN) / 512 + QUANTIZE_MIN


# Segment-rated data (the 3rd edition: human ratings of 5-second segments in frame-level validate shards,
# read as Google's readers.py YT8MFrameFeatureReader(segment_labels=True) reads them): context features
# `segment_start_times` (int64, the first frame of each rated segment, in seconds), `segment_labels`
# (int64, its class) and `segment_scores` (float, 1: the class is there, 0: it is not).
SEGMENT_FRAMES = 5  # a segment is 5 one-second frames; starts lie on that grid
# How this project scores a segment (model/segments.py): the model over its 5 frames alone, or the
# AttentionLSTM's attention over the whole video as a localiser of the video's scores.
SEGMENT_METHODS = ("model", "attention")
SEGMENT_FEATURES = ("segment_start_times", "segment_labels", "segment_scores")
# The 1,000 classes segments are rated for, in the order of Google's segment_label_ids.csv (google/youtube-8m).
# fmt: off
SEGMENT_CLASSES = (
    3, 7, 8, 11, 12, 17, 18, 19, 21, 22, 23, 28, 31, 30, 32, 33, 34, 41, 43, 45,
    46, 48, 53, 54, 52, 55, 58, 59, 60, 61, 65, 68, 73, 71, 74, 75, 76, 77, 80, 83,
    90, 88, 89, 92, 95, 100, 101, 99, 104, 105, 109, 113, 112, 115, 116, 118, 120, 121, 123, 125,
    127, 131, 128, 129, 130, 137, 141, 143, 145, 148, 152, 151, 156, 155, 158, 160, 164, 163, 169, 170,
    172, 171, 173, 174, 175, 176, 178, 182, 184, 186, 188, 187, 192, 191, 190, 194, 197, 196, 198, 201,
    202, 200, 199, 205, 204, 209, 207, 206, 210, 213, 214, 220, 218, 217, 226, 227, 231, 232, 229, 233,
    235, 237, 244, 240, 249, 246, 248, 239, 250, 245, 255, 253, 256, 261, 259, 263, 262, 266, 267, 268,
    269, 271, 276, 273, 277, 274, 278, 279, 280, 288, 291, 295, 294, 293, 297, 296, 300, 299, 303, 302,
    304, 305, 313, 307, 311, 310, 312, 316, 318, 321, 322, 331, 333, 329, 330, 334, 343, 349, 340, 344,
    348, 358, 347, 359, 355, 361, 360, 364, 365, 368, 369, 366, 370, 374, 380, 373, 385, 384, 388, 389,
    382, 393, 381, 390, 394, 399, 397, 396, 402, 400, 398, 401, 405, 406, 410, 408, 416, 415, 419, 422,
    414, 421, 424, 429, 418, 427, 434, 428, 435, 430, 441, 439, 437, 443, 440, 442, 445, 446, 448, 454,
    444, 453, 455, 451, 452, 458, 460, 465, 457, 463, 462, 461, 464, 469, 468, 472, 473, 471, 475, 474,
    477, 485, 491, 488, 482, 490, 496, 494, 483, 495, 493, 507, 501, 499, 503, 498, 514, 504, 502, 506,
    508, 511, 527, 526, 532, 513, 519, 525, 518, 528, 522, 523, 535, 539, 540, 533, 521, 541, 547, 550,
    544, 549, 551, 554, 543, 548, 557, 560, 552, 559, 563, 565, 567, 555, 576, 568, 564, 573, 581, 580,
    572, 571, 584, 590, 585, 587, 588, 592, 598, 597, 599, 603, 600, 604, 605, 614, 602, 610, 608, 611,
    612, 613, 617, 620, 607, 624, 627, 625, 631, 629, 638, 632, 634, 644, 641, 642, 646, 652, 647, 637,
    661, 635, 658, 648, 663, 668, 664, 656, 666, 671, 683, 675, 669, 676, 667, 691, 685, 673, 688, 702,
    684, 679, 694, 686, 689, 680, 693, 703, 697, 698, 692, 705, 706, 712, 711, 709, 710, 726, 713, 721,
    720, 715, 717, 730, 728, 723, 716, 722, 718, 732, 724, 736, 725, 742, 727, 735, 740, 748, 738, 746,
    751, 749, 752, 754, 760, 763, 756, 758, 766, 764, 757, 780, 767, 769, 771, 786, 785, 781, 787, 778,
    783, 792, 791, 795, 788, 805, 802, 801, 793, 796, 804, 803, 797, 814, 813, 789, 808, 818, 816, 817,
    811, 820, 826, 829, 824, 821, 825, 822, 835, 833, 843, 823, 827, 830, 832, 837, 852, 844, 841, 812,
    847, 862, 869, 860, 838, 870, 846, 858, 854, 880, 876, 857, 859, 877, 871, 855, 875, 861, 867, 892,
    898, 888, 884, 887, 891, 906, 900, 878, 885, 883, 901, 903, 907, 930, 897, 914, 917, 910, 905, 909,
    933, 932, 922, 913, 923, 931, 911, 937, 918, 955, 915, 944, 952, 945, 948, 946, 970, 974, 958, 925,
    979, 942, 965, 975, 950, 982, 940, 973, 962, 972, 957, 984, 983, 964, 1007, 971, 981, 954, 993, 991,
    996, 1005, 1015, 1009, 995, 986, 1000, 985, 980, 1016, 1011, 999, 1002, 994, 1013, 1010, 992, 1008, 1036, 1025,
    1012, 990, 1037, 1040, 1031, 1019, 1052, 1001, 1055, 1032, 1069, 1058, 1014, 1023, 1030, 1061, 1035, 1034, 1053, 1045,
    1046, 1067, 1060, 1049, 1056, 1074, 1066, 1044, 1038, 1073, 1077, 1068, 1057, 1072, 1104, 1083, 1089, 1087, 1099, 1076,
    1086, 1098, 1094, 1095, 1096, 1101, 1107, 1105, 1117, 1093, 1106, 1122, 1119, 1103, 1128, 1120, 1126, 1102, 1115, 1124,
    1123, 1131, 1136, 1144, 1121, 1137, 1132, 1133, 1157, 1134, 1143, 1159, 1164, 1155, 1142, 1150, 1148, 1161, 1165, 1147,
    1162, 1152, 1174, 1160, 1166, 1190, 1175, 1167, 1156, 1180, 1171, 1179, 1172, 1186, 1188, 1201, 1177, 1208, 1183, 1189,
    1192, 1209, 1214, 1197, 1168, 1202, 1205, 1203, 1199, 1219, 1217, 1187, 1206, 1210, 1241, 1221, 1218, 1223, 1236, 1212,
    1237, 1195, 1216, 1247, 1234, 1240, 1257, 1224, 1243, 1259, 1242, 1282, 1222, 1254, 1227, 1235, 1269, 1258, 1290, 1275,
    1262, 1252, 1248, 1272, 1246, 1225, 1245, 1277, 1298, 1288, 1271, 1265, 1286, 1260, 1266, 1296, 1280, 1285, 1293, 1276,
    1287, 1289, 1261, 1264, 1295, 1291, 1283, 1311, 1303, 1330, 1315, 1300, 1333, 1307, 1325, 1334, 1316, 1314, 1317, 1310,
    1329, 1324, 1339, 1346, 1342, 1352, 1321, 1376, 1366, 1308, 1345, 1348, 1386, 1383, 1372, 1367, 1400, 1382, 1375, 1392,
    1380, 1371, 1393, 1389, 1353, 1387, 1374, 1379, 1381, 1359, 1360, 1396, 1399, 1365, 1424, 1373, 1411, 1401, 1397, 1395,
    1412, 1394, 1368, 1423, 1391, 1435, 1409, 1443, 1402, 1425, 1415, 1421, 1426, 1433, 1420, 1452, 1436, 1430, 1408, 1458,
    1429, 1453, 1454, 1447, 1472, 1486, 1468, 1461, 1467, 1484, 1457, 1444, 1450, 1451, 1459, 1462, 1449, 1476, 1470, 1471,
    1498, 1488, 1442, 1480, 1456, 1466, 1505, 1517, 1464, 1503, 1490, 1519, 1481, 1493, 1463, 1532, 1487, 1501, 1500, 1495,
    1509, 1535, 1506, 1521, 1580, 1540, 1502, 1520, 1496, 1569, 1515, 1489, 1507, 1527, 1545, 1560, 1510, 1514, 1526, 1594,
    1511, 1572, 1548, 1584, 1556, 1588, 1628, 1555, 1568, 1550, 1622, 1563, 1603, 1616, 1576, 1549, 1537, 1593, 1618, 1645,
    1624, 1617, 1634, 1595, 1597, 1590, 1632, 1575, 1559, 1625, 1615, 1591, 1630, 1608, 1621, 1589, 1646, 1643, 1652, 1627,
    1611, 1626, 1613, 1639, 1655, 1620, 1602, 1651, 1653, 1669, 1638, 1696, 1649, 1675, 1660, 1683, 1666, 1671, 1703, 1716,
    1637, 1672, 1676, 1692, 1711, 1680, 1641, 1688, 1708, 1704, 1690, 1674, 1718, 1699, 1723, 1756, 1700, 1662, 1715, 1657,
    1733, 1728, 1670, 1712, 1685, 1724, 1735, 1714, 1730, 1747, 1656, 1737, 1705, 1693, 1713, 1689, 1753, 1739, 1721, 1725,
    1749, 1732, 1743, 1731, 1767, 1738, 1831, 1771, 1726, 1746, 1776, 1775, 1799, 1774, 1780, 1781, 1769, 1805, 1788, 1801,
)
# fmt: on
SEGMENT_CLASS_SET = frozenset(SEGMENT_CLASSES)


def quantize(features):
    """Float features (a numpy float array, any shape) -> uint8 levels of the same shape:
    q = round((clip(x, -2, 2) + 2) * 255 / 4), ties to even, computed in the array's own dtype."""
    clipped = features.clip(QUANTIZE_MIN, QUANTIZE_MAX)
    return ((clipped - QUANTIZE_MIN) * float(QUANTIZE_LEVELS) / (QUANTIZE_MAX - QUANTIZE_MIN)).round().astype("uint8")


def dequantize(levels):
    """Quantized levels given as floats -> features in about [-2, 2], x = q * 4/255 + (4/512 - 2).

    `levels`: a number, or a float array: convert uint8 first (`q.astype(np.float32)`, `q.float()` for a
    torch tensor, on the device it is on); the arithmetic keeps that dtype, so float32 in, float32 out.
    """
    return levels * DEQUANTIZE_SCALE + DEQUANTIZE_OFFSET


class Feature(NamedTuple):
    """One modality of a level: its name in the records, the Parquet column and the batch, and its width."""

    name: str
    dim: int


class Level:
    """What one level's records, Parquet files and batches hold. Use FRAME and VIDEO, or level_spec(name)."""

    name: str
    rgb: Feature
    audio: Feature
    # True: a video is up to MAX_FRAMES quantized uint8 vectors a modality, padded to a batch's longest
    # with a mask; False: one float32 vector a modality.
    per_frame: bool
    columns: tuple[str, ...]  # the Parquet layout's columns, in schema order
    model_inputs: tuple[str, ...]  # the batch entries the level's model takes, in its forward's order

    @property
    def features(self) -> tuple[Feature, Feature]:
        """(rgb, audio): the order of every feature pair in records, columns, batches and models."""
        return self.rgb, self.audio

    @property
    def feature_names(self) -> tuple[str, str]:
        return self.rgb.name, self.audio.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FrameLevel(Level):
    """One SequenceExample a video: feature lists `rgb` and `audio`, one bytes value a frame."""

    name = "frame"
    rgb = Feature("rgb", RGB_DIM)
    audio = Feature("audio", AUDIO_DIM)
    per_frame = True
    columns = ("id", "labels", "num_frames", "rgb", "audio")
    model_inputs = ("rgb", "audio", "mask")


class VideoLevel(Level):
    """One Example a video: float lists `mean_rgb` and `mean_audio`, the means of its dequantized frames."""

    name = "video"
    rgb = Feature("mean_rgb", RGB_DIM)
    audio = Feature("mean_audio", AUDIO_DIM)
    per_frame = False
    columns = ("id", "labels", "mean_rgb", "mean_audio")
    model_inputs = ("mean_rgb", "mean_audio")


FRAME, VIDEO = FrameLevel(), VideoLevel()
_BY_NAME = {FRAME.name: FRAME, VIDEO.name: VIDEO}
LEVELS = tuple(_BY_NAME)  # ("frame", "video")


class UnknownLevelError(VtagError, ValueError):
    pass


def level_spec(name: str) -> Level:
    """The level called `name`; UnknownLevelError (a ValueError) naming it for anything else."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name, which is no level either
        raise UnknownLevelError(f"unknown YouTube-8M level {name!r}: it is frame or video") from None
