using System.Text;
using System.Text.RegularExpressions;

namespace DispNative.Tests;

/// <summary>The project's Markdown documents link to each other and to sections by anchor; a moved file or renamed
/// heading would leave a link that leads nowhere.</summary>
public class DocsLinkTests
{
    private static readonly Regex Link = new(@"\]\(([^)\s]+)\)", RegexOptions.Compiled);
    private static readonly Regex ExplicitAnchor = new(@"<a id=""([^""]+)""", RegexOptions.Compiled);

    private static IEnumerable<string> Documents()
    {
        string root = TestAssets.RepoRoot;
        yield return Path.Combine(root, "README.md");
        foreach (string dir in new[] { "docs", "kernels", "tools" })
            foreach (string f in Directory.EnumerateFiles(Path.Combine(root, dir), "*.md", SearchOption.AllDirectories))
                if (!f.Contains($"{Path.DirectorySeparatorChar}bin{Path.DirectorySeparatorChar}") && !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}"))
                    yield return f;
    }

    /// <summary>A heading's anchor as GitHub makes it: lower case, letters, digits, spaces, '-' and '_' kept, spaces to
    /// '-'; a repeated anchor gets -1, -2, ...</summary>
    internal static HashSet<string> Anchors(string markdown)
    {
        var anchors = new HashSet<string>();
        var seen = new Dictionary<string, int>();
        bool fenced = false;
        foreach (string line in markdown.Split('\n'))
        {
            if (line.TrimStart().StartsWith("```")) { fenced = !fenced; continue; }
            foreach (Match m in ExplicitAnchor.Matches(line)) anchors.Add(m.Groups[1].Value);
            if (fenced || !line.StartsWith('#')) continue;
            string text = line.TrimStart('#');
            if (text.Length == line.Length || text.Length > 0 && text[0] != ' ') continue;
            var slug = new StringBuilder();
            foreach (char c in text.Trim().ToLowerInvariant())
                if (char.IsLetterOrDigit(c) || c is '-' or '_') slug.Append(c);
                else if (c == ' ') slug.Append('-');
            string s = slug.ToString();
            int n = seen.GetValueOrDefault(s);
            seen[s] = n + 1;
            anchors.Add(n == 0 ? s : $"{s}-{n}");
        }
        return anchors;
    }

    [Test]
    public void Anchors_FollowGitHubsRules()
    {
        var a = Anchors("# Two commands on a fresh machine\n## Performance (GPU)\n### H200, 2026-12-04, later: decode end to end\n" +
                        "## NVIDIA's compiler without a GPU\n```\n# not a heading\n```\n## Performance (GPU)\ntext <a id=\"the-x\"></a>\n#nospace");
        Assert.That(a, Is.EquivalentTo(new[] { "two-commands-on-a-fresh-machine", "performance-gpu", "h200-2026-12-04-later-decode-end-to-end",
            "nvidias-compiler-without-a-gpu", "performance-gpu-1", "the-x" }));
    }

    [Test]
    public void EveryRelativeLink_LeadsToAFileAndAnchorThatExist()
    {
        var broken = new List<string>();
        int checkedLinks = 0;
        foreach (string doc in Documents())
        {
            string text = File.ReadAllText(doc);
            foreach (Match m in Link.Matches(text))
            {
                string target = m.Groups[1].Value;
                if (target.Contains("://") || target.StartsWith("mailto:")) continue;
                int hash = target.IndexOf('#');
                string path = hash < 0 ? target : target[..hash], anchor = hash < 0 ? "" : target[(hash + 1)..];
                string file = path.Length == 0 ? doc : Path.GetFullPath(Path.Combine(Path.GetDirectoryName(doc)!, path));
                string where = $"{Path.GetRelativePath(TestAssets.RepoRoot, doc)}: ({target})";
                checkedLinks++;
                if (!File.Exists(file) && !Directory.Exists(file)) broken.Add($"{where}: no such file");
                else if (anchor.Length > 0 && (!File.Exists(file) || !Anchors(File.ReadAllText(file)).Contains(anchor)))
                    broken.Add($"{where}: no such section");
            }
        }
        Assert.That(checkedLinks, Is.GreaterThan(10), "the documents' links were not found");
        Assert.That(broken, Is.Empty);
    }
}
